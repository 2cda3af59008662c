"""Training data: Fashion-MNIST (the Debian ``dataset-fashion-mnist`` files), scikit-learn's digits,
and image folders with one sub-folder per class. Nothing is ever downloaded.

Every split is held in memory as ``uint8`` pixels, ``(N, C, H, W)``: Fashion-MNIST and digits at
their native size, folders already resized and centre-cropped to the model's input. Conversion to
the model's channels and size, augmentation and normalisation happen per batch
(``convscope.training.batches.BatchTransform``), so one copy of the data serves any architecture.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convscope.errors import BadArgument, DataError, ImageError
from convscope.preprocess import Preprocess
from convscope.training.wording import option_error

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "CONVSCOPE_FASHION_MNIST"
BUILTIN_DATASETS = ("fashion-mnist", "digits")
# Without a validation split of its own, a dataset lends one from its training images: best.pt is
# chosen on it, and the test split is touched once, on the chosen checkpoint (honest model selection).
DEFAULT_VAL_SPLIT = 0.1
DEFAULT_FOLDER_VAL_SPLIT = 0.2
DIGITS_TEST_FRACTION = 0.2
_HELD_OUT_FOLDERS = {"val": "val", "valid": "val", "validation": "val", "test": "test"}
_DATA_HINT = "use fashion-mnist, digits, or a folder with one sub-folder of images per class"

LoadProgress = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        images: ``(N, C, H, W)`` uint8 pixels.
        labels: ``(N,)`` int64 class indices.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.name, self.images[indices], self.labels[indices])


@dataclass(frozen=True, eq=False)
class TrainingData:
    """A dataset ready for training.

    Attributes:
        source: what was asked for (``fashion-mnist``, ``digits`` or the folder path).
        categories: class names, index-aligned with the labels.
        train: the training split.
        val: a validation split (model selection) or ``None``.
        test: a test split (final numbers) or ``None``.
        skipped: ``(path, reason)`` of every image that could not be read (folders only).
        validation: where ``val`` came from, in words (for ``data.json`` and ``result.json``).
    """

    source: str
    categories: tuple[str, ...]
    train: Split
    val: Split | None
    test: Split | None
    skipped: tuple[tuple[str, str], ...] = ()
    validation: str = ""

    @property
    def selection(self) -> Split | None:
        """The split that picks ``best.pt``: validation, never test; ``None`` means the last epoch."""
        return self.val

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (sizes, classes, where the validation split came from, skipped files)."""
        return {
            "source": self.source,
            "categories": list(self.categories),
            "validation": self.validation,
            "splits": {s.name: len(s) for s in (self.train, self.val, self.test) if s is not None},
            "image_shape": list(self.train.images.shape[1:]),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def load_training_data(
    source: str | os.PathLike[str],
    *,
    preprocess: Preprocess,
    val_split: float | None = None,
    limit: int | None = None,
    split_seed: int = 0,
    progress: LoadProgress | None = None,
) -> TrainingData:
    """Load a dataset by name or folder.

    Args:
        source: ``"fashion-mnist"``, ``"digits"`` or a folder. A folder holds one sub-folder per
            class, or ``train/`` plus ``val/`` (or ``valid/``, ``validation/``) and/or ``test/``,
            each with one sub-folder per class.
        preprocess: the model's preprocessing; folder images are resized and cropped with it
            when decoded.
        val_split: fraction of the training images held out (stratified, seeded by ``split_seed``)
            for validation and the choice of ``best.pt``. Default (``None``): 0.1 for Fashion-MNIST
            and digits, 0.2 for a folder, unless the folder has a ``val/`` split of its own. ``0``
            holds nothing out (training then keeps the last epoch). The test split never picks
            anything.
        limit: cap every split at this many images (a fixed, seeded subset), for quick runs.
        split_seed: seed of the validation split and of the ``limit`` subsets; independent of the
            training seed so every run sees the same held-out images.
        progress: ``progress(done, total)`` while decoding folder images.

    Raises:
        DataError: missing dataset, empty folder, a single class, a class without readable images.
        BadArgument: ``val_split`` outside ``[0, 1)`` or ``limit`` below 1.
    """
    if val_split is not None and not 0.0 <= val_split < 1.0:
        raise option_error(BadArgument, f"{{val_split}} {val_split}", "must be at least 0 and below 1")
    if limit is not None and limit < 1:
        raise option_error(BadArgument, f"{{limit}} {limit}", "must be at least 1")
    name = os.fspath(source)
    skipped: tuple[tuple[str, str], ...] = ()
    categories: tuple[str, ...]
    test: Split | None
    if name == "fashion-mnist":
        from convscope.models.labels import FASHION_MNIST

        train, test = _fashion_mnist()
        categories = FASHION_MNIST
    elif name == "digits":
        from convscope.models.labels import DIGITS

        train, test = _digits(split_seed)
        categories = DIGITS
    else:
        categories, train, val, test, skipped = _folder(Path(name), preprocess, split_seed, progress)
        if val is not None:
            folder_val = f"the folder's own {val.name}/ split"
            return _finish(name, categories, train, val, test, skipped, limit, split_seed, folder_val)
    if val_split is None:
        val_split = DEFAULT_VAL_SPLIT if name in BUILTIN_DATASETS else DEFAULT_FOLDER_VAL_SPLIT
    val = None
    if val_split:
        train, val = stratified_split(train, val_split, split_seed, len(categories))
    if val is None:
        validation = "none (best.pt is the last epoch)"
    else:
        validation = (
            f"{100 * val_split:g}% of the training images held out per class (split seed {split_seed})"
        )
    return _finish(name, categories, train, val, test, skipped, limit, split_seed, validation)


def _finish(
    source: str,
    categories: tuple[str, ...],
    train: Split,
    val: Split | None,
    test: Split | None,
    skipped: tuple[tuple[str, str], ...],
    limit: int | None,
    split_seed: int,
    validation: str,
) -> TrainingData:
    if limit is not None:
        train, val, test = (_limited(s, limit, split_seed) for s in (train, val, test))  # type: ignore[assignment]
    assert train is not None
    return TrainingData(source, tuple(categories), train, val, test, skipped, validation)


def _limited(split: Split | None, limit: int, seed: int) -> Split | None:
    if split is None or len(split) <= limit:
        return split
    generator = torch.Generator().manual_seed(seed + 1)
    keep = torch.randperm(len(split), generator=generator)[:limit].sort().values
    return split.subset(keep)


def stratified_split(split: Split, fraction: float, seed: int, num_classes: int) -> tuple[Split, Split | None]:
    """Hold out ``fraction`` of every class (rounded down, at least one image stays for training).

    Returns:
        ``(train, val)``; ``val`` is ``None`` when no class is big enough to give an image.
    """
    generator = torch.Generator().manual_seed(seed)
    keep: list[torch.Tensor] = []
    held: list[torch.Tensor] = []
    for label in range(num_classes):
        members = torch.nonzero(split.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(int(len(members) * fraction), max(len(members) - 1, 0))
        held.append(members[:count])
        keep.append(members[count:])
    held_all = torch.cat(held).sort().values
    keep_all = torch.cat(keep).sort().values
    if len(held_all) == 0:
        return split, None
    train = Split("train", split.images[keep_all], split.labels[keep_all])
    return train, Split("val", split.images[held_all], split.labels[held_all])


# -- Fashion-MNIST ------------------------------------------------------------------------------


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are read from (``$CONVSCOPE_FASHION_MNIST`` overrides)."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def fashion_mnist_available() -> bool:
    folder = fashion_mnist_dir()
    return all(_idx_file(folder, stem) is not None for stem in _FASHION_FILES)


_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist() -> tuple[Split, Split]:
    folder = fashion_mnist_dir()
    paths = [_idx_file(folder, stem) for stem in _FASHION_FILES]
    if any(p is None for p in paths):
        missing = [stem for stem, p in zip(_FASHION_FILES, paths, strict=True) if p is None]
        raise DataError(
            str(folder),
            f"Fashion-MNIST files not found ({', '.join(missing)}[.gz])",
            "apt-get install dataset-fashion-mnist, or point $CONVSCOPE_FASHION_MNIST at the IDX files",
        )
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    for images, labels, which in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(str(folder), f"{which} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and labels.max() > 9:
            raise DataError(str(folder), f"{which} labels go up to {labels.max()}, expected 0..9")
    return (
        Split("train", torch.from_numpy(train_x).unsqueeze(1), torch.from_numpy(train_y.astype(np.int64))),
        Split("test", torch.from_numpy(test_x).unsqueeze(1), torch.from_numpy(test_y.astype(np.int64))),
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    Returns:
        the array with the dtype and shape the header declares (``uint8`` for (Fashion-)MNIST).

    Raises:
        DataError: not an IDX file, or truncated.
    """
    file = Path(path)
    opener = gzip.open if file.suffix == ".gz" else open
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        with opener(file, "rb") as handle:  # type: ignore[operator]
            header = handle.read(4)
            if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] not in dtypes:
                raise DataError(str(file), "not an IDX file (bad magic number)")
            dims = struct.unpack(f">{header[3]}I", handle.read(4 * header[3]))
            dtype = np.dtype(dtypes[header[2]])
            payload = handle.read()
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(str(file), f"cannot read IDX file: {exc}") from exc
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(payload) != expected:
        raise DataError(str(file), f"truncated IDX file: {len(payload)} bytes of data, header says {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))



# -- fingerprints -------------------------------------------------------------------------------


def data_fingerprint(source: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the files a dataset is read from, without reading them.

    A folder: every image file's path relative to the folder, size and modification time;
    Fashion-MNIST: its four IDX files the same way; digits: scikit-learn's data file. A resumed
    run compares this with the fingerprint taken when it started, so it never continues on other
    images (one removed and another added keeps the count, not the fingerprint).

    Returns:
        ``{"kind", "unit", "count", "sha256"}`` (JSON-ready).

    Raises:
        DataError: as ``load_training_data`` for a missing dataset or an unusable folder.
    """
    name = os.fspath(source)
    if name == "fashion-mnist":
        folder = fashion_mnist_dir()
        paths = [_idx_file(folder, stem) for stem in _FASHION_FILES]
        if any(p is None for p in paths):
            _fashion_mnist()  # raises the missing-files error
        return _fingerprint("fashion-mnist", "IDX files", folder, [p for p in paths if p is not None])
    if name == "digits":
        try:
            import sklearn.datasets
        except ImportError as exc:
            raise DataError("digits", "needs scikit-learn", "pip install scikit-learn") from exc
        folder = Path(sklearn.datasets.__file__).parent / "data"
        found = [p for p in (folder / "digits.csv.gz",) if p.is_file()]
        return _fingerprint("digits", "data files", folder, found)
    folder = Path(name)
    _, _, files = _folder_files(folder)
    return _fingerprint("folder", "image files", folder, [path for _, path, _ in files])


def _fingerprint(kind: str, unit: str, root: Path, paths: Sequence[Path]) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        try:
            info = path.stat()
        except OSError as exc:
            raise DataError(str(path), f"cannot read: {(exc.strerror or type(exc).__name__).lower()}") from exc
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return {"kind": kind, "unit": unit, "count": len(paths), "sha256": digest.hexdigest()}


# -- digits -------------------------------------------------------------------------------------


def _digits(split_seed: int) -> tuple[Split, Split]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("digits", "needs scikit-learn", "pip install scikit-learn") from exc
    bunch = load_digits()
    # 0..16 grey levels -> 0..255.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    full = Split("train", torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64)))
    train, test = stratified_split(full, DIGITS_TEST_FRACTION, split_seed, 10)
    assert test is not None
    return train, Split("test", test.images, test.labels)


# -- image folders ------------------------------------------------------------------------------


def _class_folders(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(str(folder), f"cannot list folder: {(exc.strerror or type(exc).__name__).lower()}") from exc
    return [e for e in entries if e.is_dir() and not e.name.startswith(".")]


def _folder(
    folder: Path, preprocess: Preprocess, split_seed: int, progress: LoadProgress | None
) -> tuple[tuple[str, ...], Split, Split | None, Split | None, tuple[tuple[str, str], ...]]:
    categories, roots, files = _folder_files(folder)
    images, skipped = _decode_all([path for _, path, _ in files], preprocess, progress)
    splits: dict[str, Split] = {}
    for which in roots:
        rows = [i for i, (w, _, _) in enumerate(files) if w == which and images[i] is not None]
        if not rows:
            if which == "train":
                break
            continue
        pixels = torch.from_numpy(np.stack([images[i] for i in rows]))  # type: ignore[misc]
        labels = torch.tensor([files[i][2] for i in rows], dtype=torch.int64)
        splits[which] = Split(which, pixels, labels)
    train = splits.get("train")
    counts = torch.bincount(train.labels, minlength=len(categories)) if train is not None else None
    empty = [c for i, c in enumerate(categories) if counts is None or counts[i] == 0]
    if empty:
        where = roots["train"]
        if len(empty) == len(categories):
            reason = "no readable images in any class folder"
            if skipped:
                reason += f" ({len(skipped)} unreadable, first: {skipped[0][0]}: {skipped[0][1]})"
            raise DataError(str(where), reason)
        raise DataError(
            str(where / empty[0]),
            "class folder has no readable images"
            + (f" ({len(empty)} such classes: {', '.join(empty[:5])})" if len(empty) > 1 else ""),
            "add images or remove the folder",
        )
    assert train is not None
    return tuple(categories), train, splits.get("val"), splits.get("test"), tuple(skipped)


def _folder_files(folder: Path) -> tuple[list[str], dict[str, Path], list[tuple[str, Path, int]]]:
    """A folder dataset's classes, split roots and ``(split, image path, label)`` files, undecoded."""
    if not folder.exists():
        raise DataError(str(folder), "no such dataset or folder", _DATA_HINT)
    if not folder.is_dir():
        raise DataError(str(folder), "is a file, not a folder of class sub-folders", _DATA_HINT)
    subfolders = {p.name.lower(): p for p in _class_folders(folder)}
    held_names = [n for n in subfolders if n in _HELD_OUT_FOLDERS]
    if "train" in subfolders and held_names:
        categories = _categories(subfolders["train"])
        roots: dict[str, Path] = {"train": subfolders["train"]}
        for name in held_names:
            roots.setdefault(_HELD_OUT_FOLDERS[name], subfolders[name])
        for which, root in roots.items():
            extra = sorted({p.name for p in _class_folders(root)} - set(categories))
            if extra:
                raise DataError(str(root), f"has classes not in train/: {', '.join(extra)}")
    else:
        categories = _categories(folder)
        roots = {"train": folder}
    files: list[tuple[str, Path, int]] = []
    for which, root in roots.items():
        for label, name in enumerate(categories):
            class_dir = root / name
            if class_dir.is_dir():
                from convscope.imageio import iter_images

                files.extend((which, path, label) for path in iter_images([class_dir]))
    return categories, roots, files


def _categories(folder: Path) -> list[str]:
    classes = [p.name for p in _class_folders(folder)]
    if not classes:
        from convscope.imageio import iter_images

        loose = iter_images([folder], recursive=False)
        if loose:
            raise DataError(
                str(folder), f"holds {len(loose)} images but no class sub-folders",
                "put the images of each class in their own sub-folder",
            )
        raise DataError(str(folder), "is empty: expected one sub-folder of images per class", _DATA_HINT)
    if len(classes) == 1:
        raise DataError(
            str(folder), f"has only one class ({classes[0]}); training needs at least two class sub-folders"
        )
    return classes


def _decode_all(
    paths: Sequence[Path], preprocess: Preprocess, progress: LoadProgress | None
) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    def decode(path: Path) -> np.ndarray | str:
        try:
            # Reduced decode: a folder of camera photos costs memory by the model's input
            # size, not by the photos' pixel counts (Preprocess.load_image).
            pixels = np.asarray(preprocess.to_pil(preprocess.load_image(path)), dtype=np.uint8)
        except ImageError as exc:
            return exc.reason
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    results: list[np.ndarray | None] = []
    skipped: list[tuple[str, str]] = []
    # Pillow releases the GIL while decoding, so threads overlap the work; map keeps the order.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for done, (path, out) in enumerate(zip(paths, pool.map(decode, paths), strict=True), start=1):
            if isinstance(out, str):
                skipped.append((str(path), out))
                results.append(None)
            else:
                results.append(out)
            if progress is not None:
                progress(done, len(paths))
    return results, skipped
