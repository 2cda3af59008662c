"""Issue 8, item 8: big photos decode at reduced size, so memory follows the model's input size
and the batch, not the photos' pixel counts; the tensors stay those of the full decode."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import convscope.preprocess as preprocess_module
from convscope.imageio import SOURCE_INFO, ReducedSource, load_image
from convscope.preprocess import IMAGENET, Preprocess

# Odd sizes on purpose: the last block of every reduction is partial, which is where a wrong
# source box would show (a shift of up to one reduced pixel).
WIDTH, HEIGHT = 3001, 2003


def _photo(size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    """A real photo (scikit-image's Chelsea) at camera size."""
    import skimage.data

    return Image.fromarray(skimage.data.chelsea()).resize(size, Image.Resampling.LANCZOS)


def _hard(size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    """The worst case for anti-aliasing: the photo plus per-pixel noise and 1-pixel lines."""
    rng = np.random.default_rng(0)
    pixels = np.asarray(_photo(size)).astype(np.float32) + rng.normal(0, 12, (size[1], size[0], 3))
    pixels[::97] = 255
    pixels[:, ::89] = 0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("big")
    files = {
        "photo.jpg": (_photo(), {"quality": 92}),
        "hard.jpg": (_hard(), {"quality": 92}),
        "hard.png": (_hard(), {"compress_level": 1}),
    }
    paths = {}
    for name, (image, options) in files.items():
        image.save(folder / name, **options)
        paths[name] = folder / name
    return paths


def _plain(image: Image.Image) -> Image.Image:
    """The same pixels without any ``info``."""
    return Image.fromarray(np.asarray(image))


def _pixel_difference(a: torch.Tensor, b: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """|a - b| of two normalised batches in 0..255 pixel units."""
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return ((a - b) * std * 255).abs()


# Tolerances, in 0..255 pixel units. The reduced decode differs from the full one only in the
# anti-aliasing before the final bilinear resize: box averaging (JPEG: the decoder's scaled
# inverse DCT) then a bilinear filter 3x or more wide, instead of one wide bilinear filter.
# Both pass the same low frequencies; they differ where the image has detail near the output
# resolution's Nyquist limit: little on a photo, most on per-pixel noise and 1-pixel lines.
# Measured: photo mean 0.10, max 1; hard JPEG mean 0.53, max 5; hard PNG mean 0.50, max 4.
TOLERANCE = {"photo.jpg": (0.25, 2.0), "hard.jpg": (0.8, 8.0), "hard.png": (0.8, 8.0)}


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_reduced_decode_gives_the_full_decode_tensor(photos: dict[str, Path], name: str) -> None:
    pre = IMAGENET
    full = pre.to_tensor(load_image(photos[name]))
    reduced_image = pre.load_image(photos[name])
    reduced = pre.to_tensor(reduced_image)
    assert reduced.shape == full.shape == (1, 3, 224, 224)
    # Shorter side at least 3 x 256 = 768, and much smaller than the photo.
    assert 768 <= min(reduced_image.size) < 2 * 768
    source = reduced_image.info[SOURCE_INFO]
    assert isinstance(source, ReducedSource) and source.full_size == (WIDTH, HEIGHT)
    difference = _pixel_difference(full, reduced, pre)
    mean_limit, max_limit = TOLERANCE[name]
    assert float(difference.mean()) < mean_limit
    assert float(difference.max()) <= max_limit


def test_jpeg_decodes_in_draft_mode(photos: dict[str, Path]) -> None:
    # 3001x2003 for a 768 shorter side: the decoder's 1/2 scale, rounded up (no full-size pixels).
    assert IMAGENET.load_image(photos["photo.jpg"]).size == (1501, 1002)
    # A PNG has no draft mode: decoded whole, then box-averaged by 2 (2003 // 768), rounded up.
    assert IMAGENET.load_image(photos["hard.png"]).size == (1501, 1002)


# 4k + 1 pixels: the decoder's 1/4 scale leaves a last block of one pixel, a 3/4-pixel
# overhang that the source box must account for (after an EXIF turn, at the left or top).
ODD_SIZE = (2409, 1609)
SMALL_PRESET = Preprocess(resize=100, crop=96)  # decodes down to a 300-pixel shorter side


@pytest.fixture(scope="module")
def turned(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("turned")
    image = _hard(ODD_SIZE)
    paths = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths[orientation] = folder / f"turned{orientation}.jpg"
        image.save(paths[orientation], quality=92, exif=exif.tobytes())
    return paths


def test_phone_mpo_files_decode_in_draft_mode_too(tmp_path: Path) -> None:
    path = tmp_path / "pair.mpo"
    first = _photo(ODD_SIZE)
    first.save(path, format="MPO", save_all=True, append_images=[first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    reduced = SMALL_PRESET.load_image(path)
    assert reduced.size == (603, 403)  # the decoder's 1/4 scale, as for a plain JPEG
    full = SMALL_PRESET.to_tensor(load_image(path))
    assert float(_pixel_difference(full, SMALL_PRESET.to_tensor(reduced), SMALL_PRESET).max()) <= 2.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_keep_the_geometry(turned: dict[int, Path], orientation: int) -> None:
    # The draft's partial block is at the stored image's right/bottom; after the EXIF turn it
    # may be at the left or top, and the source box must follow it. (Measured: mean 0.45, max
    # 4 for every orientation; leaving the box unturned gives a mean of 1.9 or a box outside
    # the image.)
    pre = SMALL_PRESET
    full_image = load_image(turned[orientation])
    reduced_image = pre.load_image(turned[orientation])
    swapped = orientation in (5, 6, 7, 8)
    assert full_image.size == ((1609, 2409) if swapped else (2409, 1609))
    assert reduced_image.size == ((403, 603) if swapped else (603, 403))  # 1/4 scale, rounded up
    assert reduced_image.info[SOURCE_INFO].full_size == full_image.size
    difference = _pixel_difference(pre.to_tensor(full_image), pre.to_tensor(reduced_image), pre)
    assert float(difference.mean()) < 0.8
    assert float(difference.max()) <= 8.0


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess(resize=None, crop=64, mean=(0.5,), std=(0.5,), channels=1),  # squash, grey
        Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),  # tiny
    ],
    ids=["squash-grey", "tiny"],
)
def test_other_presets(photos: dict[str, Path], pre: Preprocess) -> None:
    full = pre.to_tensor(load_image(photos["photo.jpg"]))
    reduced_image = pre.load_image(photos["photo.jpg"])
    assert pre.decode_side <= min(reduced_image.size) <= 2 * pre.decode_side
    reduced = pre.to_tensor(reduced_image)
    assert reduced.shape == full.shape == (1, pre.channels, pre.crop, pre.crop)
    assert float(_pixel_difference(full, reduced, pre).max()) <= 2.0


def test_small_images_are_decoded_whole_and_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "small.jpg"
    _photo((700, 500)).save(path, quality=90)  # shorter side under 3 x 256
    whole, reduced = load_image(path), IMAGENET.load_image(path)
    assert SOURCE_INFO not in reduced.info
    assert np.array_equal(np.asarray(whole), np.asarray(reduced))
    torch.testing.assert_close(IMAGENET.to_tensor(whole), IMAGENET.to_tensor(reduced), rtol=0, atol=0)


def test_an_edited_reduced_image_is_resized_as_what_it_now_is(photos: dict[str, Path]) -> None:
    reduced = IMAGENET.load_image(photos["photo.jpg"])
    left_half = reduced.crop((0, 0, reduced.width // 2, reduced.height))
    assert SOURCE_INFO in left_half.info  # Pillow copies info into derived images...
    expected = IMAGENET.to_tensor(_plain(left_half))
    # ...so the source is checked against the size it was recorded for, and ignored here.
    torch.testing.assert_close(IMAGENET.to_tensor(left_half), expected, rtol=0, atol=0)
    view = IMAGENET.to_pil(reduced)
    assert view.size == (224, 224) and SOURCE_INFO not in view.info


def test_without_the_source_box_the_geometry_would_shift(turned: dict[int, Path]) -> None:
    # What the box buys: resizing the reduced pixels as if they were the whole photo (sizes and
    # sample positions from the reduced image) is much further from the full decode (measured:
    # mean 1.5 against 0.45).
    pre = SMALL_PRESET
    full = pre.to_tensor(load_image(turned[1]))
    reduced_image = pre.load_image(turned[1])
    naive = _pixel_difference(full, pre.to_tensor(_plain(reduced_image)), pre)
    good = _pixel_difference(full, pre.to_tensor(reduced_image), pre)
    assert float(naive.mean()) > 2 * float(good.mean())


def test_training_folders_decode_at_reduced_size(photos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convscope.training.data import load_training_data

    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(2):
            shutil.copyfile(photos["photo.jpg"], tmp_path / label / f"{i}.jpg")
    asked: list[Any] = []
    real = preprocess_module._load_image

    def spy(path: Any, **options: Any) -> Image.Image:
        asked.append(options.get("reduce_to"))
        return real(path, **options)

    monkeypatch.setattr(preprocess_module, "_load_image", spy)
    pre = Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    data = load_training_data(tmp_path, preprocess=pre, val_split=0.0)
    assert asked == [3 * 36] * 4
    expected = np.asarray(pre.to_pil(load_image(photos["photo.jpg"]))).transpose(2, 0, 1)
    images = np.asarray(data.train.images)
    assert images.shape == (4, 3, 32, 32)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.slow
def test_classify_peak_memory_with_32_camera_photos(tmp_path_factory: pytest.TempPathFactory) -> None:
    """32 photos of 6000x4000 at -b 32 stay under 2 GB peak RSS (measured 1.42 GB; 4.4 GB before
    reduced decoding, when a batch held 32 full decodes of 72 MB each; ~1.2 GB of the total is
    importing torch and loading the model)."""
    folder = tmp_path_factory.mktemp("camera")
    _photo((6000, 4000)).save(folder / "photo_00.jpg", quality=85)
    for i in range(1, 32):
        shutil.copyfile(folder / "photo_00.jpg", folder / f"photo_{i:02d}.jpg")
    # A fresh Python whose only child is the CLI: RUSAGE_CHILDREN is then that run's peak.
    runner = textwrap.dedent(
        """
        import json, resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "convscope", "classify", sys.argv[1], "-b", "32", "--json"],
                              capture_output=True, text=True)
        print(json.dumps({"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                          "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
        """
    )
    report = json.loads(subprocess.run(
        [sys.executable, "-c", runner, str(folder)], capture_output=True, text=True, timeout=600, check=True
    ).stdout)
    assert report["code"] == 0, report["stderr"]
    results = json.loads(report["stdout"])
    assert len(results) == 32 and all(r["predictions"][0]["label"] for r in results)
    peak_gib = report["peak_kib"] / 2**20
    assert peak_gib < 2.0, f"peak RSS {peak_gib:.2f} GiB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0  # (Linux reports KiB)
