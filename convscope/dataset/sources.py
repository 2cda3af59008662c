"""Where the images of a dataset pass come from: a folder, a list file, Fashion-MNIST or a tensor.

A source is a numbered sequence of images. Mining reads slices of it in order
(``batches(range)``); the projection pass reads back a few chosen images (``load``). Images are
named in results by ``key(i)``: the file path for files, the position for Fashion-MNIST and
tensors. An unreadable file never stops a pass: it comes back in ``Batch.failed`` with its reason.

Fashion-MNIST is read straight from Debian's gzipped IDX files, a batch at a time, so memory does
not grow with the number of images (the whole training split would be 47 MB of pixels).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from convscope.errors import DataError, ImageError
from convscope.imageio import IMAGE_SUFFIXES, iter_images, load_image
from convscope.preprocess import Preprocess

FASHION_MNIST_SPLITS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


@dataclass(frozen=True)
class Batch:
    """Images ``start..stop`` of a source, the readable ones stacked.

    Attributes:
        indices: ``(B,)`` int64 source positions of the images in ``images``, ascending.
        images: ``(B, C, H, W)`` float32 normalised network input.
        failed: ``(position, reason)`` of the images that could not be read.
        consumed: how many positions the batch covers (``B + len(failed)``).
    """

    indices: torch.Tensor
    images: torch.Tensor
    failed: tuple[tuple[int, str], ...]
    consumed: int


class ImageSource:
    """A numbered sequence of images for one model's preprocessing (see the module docstring)."""

    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str | int:
        """What results call image ``index``: its path, or the index itself."""
        return index

    def fingerprint(self) -> str | None:
        """A SHA-256 hex digest that changes when the images change, so a resumed pass can tell
        it is reading the same data; ``None`` when the source cannot tell (then nothing is checked).
        """
        return None

    def batches(self, positions: range, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        """Consecutive batches covering ``positions`` in order."""
        raise NotImplementedError

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """``(len(indices), C, H, W)`` network input for these positions (repeats allowed).

        Raises:
            ImageError: an image that cannot be read (it was readable while mining).
        """
        raise NotImplementedError

    def labels(self) -> list[int] | None:
        """The dataset's class of every image, in order, when the data carries labels (Fashion-MNIST);
        ``None`` for folders, lists and tensors."""
        return None


def files_digest(paths: Sequence[Path]) -> str:
    """SHA-256 hex digest of each file's path, size and modification time, in order.

    Stat, not the bytes: a folder of a million images is checked in seconds, and a file rewritten
    in place gets a new modification time. A missing or unreadable file counts as such.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            info = os.stat(path)
            facts = f"{info.st_size}:{info.st_mtime_ns}"
        except OSError as exc:
            facts = f"unreadable:{exc.errno}"
        digest.update(os.fsencode(path) + b"\0" + facts.encode() + b"\n")
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of a tensor's dtype, shape and bytes (any dtype, any device)."""
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _stack(items: list[tuple[int, np.ndarray | None, str]], preprocess: Preprocess) -> Batch:
    """The decoded crops (uint8, ``(H, W)`` or ``(H, W, C)``) -> one normalised batch.

    The same numbers as ``Preprocess.to_tensor`` (float32, ``/ 255``, then the model's mean and
    std), built once for the batch: per-image tensors and a ``torch.stack`` cost more than the
    decoding on a busy machine (each small parallel copy waits for a second core), and the
    workers hand over a quarter of the bytes.
    """
    fallback_shape = preprocess.input_size
    good = [(i, t) for i, t, _ in items if t is not None]
    failed = tuple((i, reason) for i, t, reason in items if t is None)
    if good:
        indices = torch.tensor([i for i, _ in good], dtype=torch.int64)
        pixels = np.stack([t if t.ndim == 3 else t[:, :, None] for _, t in good]).astype(np.float32) / 255.0
        images = preprocess.normalize(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    else:
        indices = torch.empty(0, dtype=torch.int64)
        images = torch.empty((0, *fallback_shape))
    return Batch(indices, images, failed, len(items))


class _Decode(Dataset[tuple[int, np.ndarray | None, str]]):
    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, positions: range) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> tuple[int, np.ndarray | None, str]:
        index = self.positions[item]
        try:
            return index, np.asarray(self.preprocess.to_pil(load_image(self.paths[index]))), ""
        except ImageError as exc:
            return index, None, exc.reason


def _as_items(items: list[tuple[int, np.ndarray | None, str]]) -> list[tuple[int, np.ndarray | None, str]]:
    return items  # keep the per-image tuples; stacking happens in the main process


class FileSource(ImageSource):
    """Image files, decoded with ``load_image`` and the model's preprocessing, by DataLoader
    workers when ``workers > 0``."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, description: str = "") -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.description = description or f"{len(self.paths)} files"

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str | int:
        return str(self.paths[index])

    def fingerprint(self) -> str | None:
        """Over every file's path, size and modification time, in order (see ``files_digest``)."""
        return files_digest(self.paths)

    def batches(self, positions: range, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        if len(positions) == 0:
            return
        loader: DataLoader[Any] = DataLoader(
            _Decode(self.paths, self.preprocess, positions),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_as_items,
            # Workers decode; one image per batch ahead per worker is enough to hide it.
            prefetch_factor=2 if workers > 0 else None,
        )
        for items in loader:
            yield _stack(items, self.preprocess)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        images = [load_image(self.paths[i]) for i in indices]
        return self.preprocess.to_tensor(images)


class TensorSource(ImageSource):
    """An in-memory ``(N, C, H, W)`` float tensor, already normalised for the model."""

    def __init__(self, images: torch.Tensor, description: str = "") -> None:
        if images.dim() != 4:
            raise DataError("data", f"expected an (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        self.images = images
        self.description = description or f"tensor {tuple(images.shape)}"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> str | None:
        """Over the tensor's shape, dtype and bytes."""
        return tensor_digest(self.images)

    def batches(self, positions: range, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        for start in range(positions.start, positions.stop, batch_size):
            stop = min(start + batch_size, positions.stop)
            yield Batch(torch.arange(start, stop), self.images[start:stop].float(), (), stop - start)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(list(indices), dtype=torch.int64)].float()


class IdxSource(ImageSource):
    """Images of an IDX file (the MNIST format, gzipped or not), read a batch at a time.

    Pixels become network input with the training lab's ``BatchTransform`` (grey to RGB and
    resizing when the model wants them, then its mean/std).
    """

    def __init__(self, path: Path, preprocess: Preprocess, description: str = "") -> None:
        from convscope.training.batches import BatchTransform

        self.path = path
        self.transform = BatchTransform(preprocess)
        self.description = description or str(path)
        with self._open() as handle:
            self.count, self.height, self.width, self.offset = _idx_image_header(handle, path)
        self.row_bytes = self.height * self.width

    def _open(self) -> IO[bytes]:
        try:
            if self.path.suffix == ".gz":
                return gzip.open(self.path, "rb")  # type: ignore[return-value]
            return open(self.path, "rb")
        except OSError as exc:
            raise DataError(str(self.path), f"cannot open: {(exc.strerror or type(exc).__name__).lower()}") from exc

    def __len__(self) -> int:
        return self.count

    def fingerprint(self) -> str | None:
        """Over the IDX file's path, size and modification time."""
        return files_digest([self.path])

    def _read(self, handle: IO[bytes], rows: int) -> torch.Tensor:
        try:
            payload = handle.read(rows * self.row_bytes)
        except (OSError, EOFError) as exc:
            raise DataError(str(self.path), f"cannot read IDX file: {exc}") from exc
        if len(payload) != rows * self.row_bytes:
            raise DataError(str(self.path), "truncated IDX file")
        pixels = np.frombuffer(payload, dtype=np.uint8).reshape(rows, 1, self.height, self.width)
        return torch.from_numpy(pixels.copy())

    def batches(self, positions: range, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        if len(positions) == 0:
            return
        with self._open() as handle:
            # gzip seeks by decompressing up to the offset: a fraction of a second for 60k images.
            handle.seek(self.offset + positions.start * self.row_bytes)
            for start in range(positions.start, positions.stop, batch_size):
                stop = min(start + batch_size, positions.stop)
                pixels = self._read(handle, stop - start)
                yield Batch(torch.arange(start, stop), self.transform(pixels), (), stop - start)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        wanted = sorted(set(indices))
        rows: dict[int, torch.Tensor] = {}
        with self._open() as handle:
            position = 0
            handle.seek(self.offset)
            for index in wanted:
                if index != position:
                    handle.seek(self.offset + index * self.row_bytes)
                rows[index] = self._read(handle, 1)[0]
                position = index + 1
        return self.transform(torch.stack([rows[i] for i in indices]))

    def labels(self) -> list[int] | None:
        from convscope.training.data import read_idx

        path = _labels_file(self.path)
        if path is None:
            return None
        values = read_idx(path)
        if values.ndim != 1 or len(values) != self.count:
            raise DataError(str(path), f"holds {values.shape} labels for {self.count} images")
        return [int(v) for v in values]


def _labels_file(images: Path) -> Path | None:
    """The labels file beside an IDX image file (``train-images-idx3-ubyte[.gz]`` ->
    ``train-labels-idx1-ubyte[.gz]``), when there is one."""
    if "-images-idx3-" not in images.name:
        return None
    for suffix in (".gz", ""):
        candidate = images.with_name(images.name.replace("-images-idx3-", "-labels-idx1-").removesuffix(".gz") + suffix)
        if candidate.is_file():
            return candidate
    return None


def _idx_image_header(handle: IO[bytes], path: Path) -> tuple[int, int, int, int]:
    try:
        header = handle.read(16)
    except (OSError, EOFError) as exc:
        raise DataError(str(path), f"cannot read IDX file: {exc}") from exc
    if len(header) < 16 or header[:3] != b"\x00\x00\x08" or header[3] != 3:
        raise DataError(str(path), "not an IDX file of uint8 images (bad magic number)")
    count, height, width = struct.unpack(">3I", header[4:16])
    return count, height, width, 16


def fashion_mnist_source(split: str, preprocess: Preprocess) -> IdxSource:
    """Debian's Fashion-MNIST images of ``split`` (``train``: 60,000; ``test``: 10,000).

    Raises:
        DataError: unknown split, or the files are not installed.
    """
    from convscope.training.data import fashion_mnist_dir

    if split not in FASHION_MNIST_SPLITS:
        raise DataError(f"fashion-mnist:{split}", "unknown split", "use fashion-mnist:train or fashion-mnist:test")
    folder = fashion_mnist_dir()
    stem = FASHION_MNIST_SPLITS[split]
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return IdxSource(folder / name, preprocess, f"fashion-mnist:{split}")
    raise DataError(
        str(folder), f"Fashion-MNIST file not found ({stem}[.gz])",
        "apt-get install dataset-fashion-mnist, or point $CONVSCOPE_FASHION_MNIST at the IDX files",
    )


def read_path_list(path: Path) -> list[Path]:
    """One image path per line; blank lines and ``#`` comments skipped; relative paths are
    relative to the list file's folder.

    Raises:
        DataError: unreadable or not text.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), "is neither an image nor a UTF-8 text file of image paths") from exc
    except OSError as exc:
        raise DataError(str(path), f"cannot read: {(exc.strerror or type(exc).__name__).lower()}") from exc
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        item = Path(entry).expanduser()
        paths.append(item if item.is_absolute() else path.parent / item)
    return paths


def open_source(data: Any, preprocess: Preprocess) -> ImageSource:
    """Turn what the user gave into a source.

    Args:
        data: an ``ImageSource``; ``"fashion-mnist"`` / ``"fashion-mnist:train"`` /
            ``"fashion-mnist:test"``; a folder (searched recursively for images); an image file;
            a text file of image paths; a list of paths; or a normalised ``(N, C, H, W)`` tensor.

    Raises:
        DataError: nothing to read, or no such file or folder.
    """
    if isinstance(data, ImageSource):
        source = data
    elif isinstance(data, torch.Tensor):
        source = TensorSource(data)
    elif isinstance(data, (str, os.PathLike)) and str(data).split(":")[0] == "fashion-mnist":
        name = str(data)
        split = name.partition(":")[2] or "train"
        source = fashion_mnist_source(split, preprocess)
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            source = FileSource(iter_images([path]), preprocess, str(path))
        elif not path.exists():
            raise DataError(str(path), "no such folder or file", "give an image folder, a text file of paths, or fashion-mnist[:train|:test]")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            source = FileSource([path], preprocess, str(path))
        else:
            source = FileSource(read_path_list(path), preprocess, str(path))
    elif isinstance(data, Sequence):
        source = FileSource(iter_images(data), preprocess, f"{len(data)} paths")
    else:
        raise DataError("data", f"cannot read images from a {type(data).__name__}")
    if len(source) == 0:
        raise DataError(source.description or "data", "no images to look at (empty dataset)")
    return source
