"""convscope.imageio: untrusted image files in, atomic files out."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import stat
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

from convscope.errors import DataError, ImageError, OutputError
from convscope.imageio import (
    IMAGE_SUFFIXES,
    atomic_path,
    atomic_write,
    iter_images,
    load_image,
    save_png,
)

# -- helpers -----------------------------------------------------------------------------------


def _save(path: Path, image: Image.Image, **params: object) -> Path:
    image.save(path, **params)
    return path


def _assert_image_error(path: Path, reason: str, *, max_pixels: int = 100_000_000) -> ImageError:
    """load_image(path) raises ImageError whose one-line message is ``<path>: <reason>...``."""
    with pytest.raises(ImageError, match=reason) as caught:
        load_image(path, max_pixels=max_pixels)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert caught.value.subject == str(path)
    return caught.value


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _write_blank_1bit_png(path: Path, width: int, height: int) -> Path:
    """A real, valid all-black 1-bit PNG, streamed so that no full-size buffer ever exists."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(1)
    rows_per_chunk = 256
    parts = []
    for start in range(0, height, rows_per_chunk):
        parts.append(compressor.compress(row * min(rows_per_chunk, height - start)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _noise_rgb(size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8
    return pixels


# -- errors: the file itself -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _assert_image_error(tmp_path / "nope.jpg", "no such file")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    _assert_image_error(folder, "is a directory, not an image file")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "secret.png", _noise_rgb())
    path.chmod(0)
    if os.access(path, os.R_OK):  # running as root: permissions do not stop reads, so fake the refusal
        real_open = builtins.open

        def refuse(file, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refuse)
    try:
        _assert_image_error(path, "permission denied")
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)  # opening it for reading would block until a writer appears
    _assert_image_error(path, "not a regular file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    _assert_image_error(path, re.escape("empty file (0 bytes)"))


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    error = _assert_image_error(path, "not an image: cannot identify the format")
    assert "supported: JPEG, PNG" in str(error)


def test_formats_outside_the_allow_list_are_not_parsed(tmp_path: Path) -> None:
    # EPS would be decoded by running Ghostscript on untrusted PostScript.
    path = _save(tmp_path / "drawing.png", Image.new("RGB", (8, 8), "red"), format="EPS")
    assert Image.open(path).format == "EPS"  # Pillow itself would take it
    _assert_image_error(path, "not an image: cannot identify the format")


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [("JPEG", 0.5), ("PNG", 0.5), ("JPEG", 40), ("PNG", 20)],
    ids=["jpeg-half", "png-half", "jpeg-header-cut", "png-header-cut"],
)
def test_truncated_image(tmp_path: Path, fmt: str, keep: float) -> None:
    buffer = io.BytesIO()
    _noise_rgb().save(buffer, format=fmt)
    data = buffer.getvalue()
    cut = int(len(data) * keep) if keep < 1 else int(keep)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[:cut])
    _assert_image_error(path, "truncated or corrupt image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_io_error_while_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "on_a_share.png", _noise_rgb())

    def fail(self: ImageFile.ImageFile) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    _assert_image_error(path, "read error: input/output error")


def test_pillow_globals_untouched(tmp_path: Path) -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    load_image(_save(tmp_path / "ok.png", _noise_rgb()))
    with pytest.raises(ImageError):
        load_image(_write_blank_1bit_png(tmp_path / "bomb.png", 30_000, 30_000))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    assert before[0] is False


# -- errors: decompression bombs -------------------------------------------------------------------


def test_bomb_rejected_from_header(tmp_path: Path) -> None:
    path = _write_blank_1bit_png(tmp_path / "bomb.png", 30_000, 30_000)
    assert path.stat().st_size < 1_000_000
    _assert_image_error(path, re.escape("image is 30000x30000 (900 Mpx), over the 100 Mpx limit"))


def test_max_pixels_checked_before_decoding(tmp_path: Path) -> None:
    path = _save(tmp_path / "small.png", _noise_rgb((64, 64)))
    _assert_image_error(
        path, re.escape("image is 64x64 (4096 px), over the 1000 px limit"), max_pixels=1000
    )
    assert load_image(path, max_pixels=4096).size == (64, 64)


def test_pillow_bomb_warning_is_an_error_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000 px, refuses above 2000
    path = _save(tmp_path / "warn.png", _noise_rgb((40, 40)))
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        _assert_image_error(
            path,
            re.escape("image is 40x40 (1600 px), over Pillow's 1000 px limit (PIL.Image.MAX_IMAGE_PIXELS)"),
        )
    assert not [w for w in leaked if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_bomb_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = _save(tmp_path / "refused.gif", Image.new("P", (50, 50)))
    _assert_image_error(path, re.escape("image is 50x50 (2500 px), over Pillow's 1000 px limit"))


def test_max_pixels_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        load_image(tmp_path / "any.png", max_pixels=0)


# -- success: ordinary files -----------------------------------------------------------------------


def test_real_photo() -> None:
    path = Path(skimage.data.data_dir) / "chelsea.png"
    image = load_image(path)
    assert image.size == (451, 300)
    np.testing.assert_array_equal(_rgb_pixels(image), np.asarray(Image.open(path).convert("RGB")))


def test_result_is_fully_decoded(tmp_path: Path) -> None:
    source = _noise_rgb()
    path = _save(tmp_path / "photo.png", source)
    image = load_image(path)
    path.unlink()  # pixels must not be read lazily from the file
    np.testing.assert_array_equal(_rgb_pixels(image), np.asarray(source))


def test_jpeg_rgb(tmp_path: Path) -> None:
    path = _save(tmp_path / "flat.jpg", Image.new("RGB", (16, 16), (200, 100, 50)), quality=95)
    pixels = _rgb_pixels(load_image(path))
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_allclose(pixels[8, 8], (200, 100, 50), atol=3)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_uses_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    pixels = _rgb_pixels(load_image(path))
    assert pixels.shape == (6, 8, 3)
    assert (pixels == (255, 0, 0)).all()


# -- success: colour modes -------------------------------------------------------------------------


def test_grey_l(tmp_path: Path) -> None:
    path = _save(tmp_path / "grey.png", Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)))
    assert Image.open(path).mode == "L"
    pixels = _rgb_pixels(load_image(path))
    np.testing.assert_array_equal(pixels[0], [[0, 0, 0], [77, 77, 77], [255, 255, 255]])


def test_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    path = _save(tmp_path / "bits.png", image)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(_rgb_pixels(load_image(path))[0], [[0, 0, 0], [255, 255, 255]])


def _palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 10, 200, 30])
    for x in range(3):
        image.putpixel((x, 0), x)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette(tmp_path: Path, fmt: str) -> None:
    path = _save(tmp_path / f"pal.{fmt.lower()}", _palette_image(None))
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(_rgb_pixels(load_image(path))[0], [[255, 0, 0], [0, 0, 255], [10, 200, 30]])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_over_white(tmp_path: Path, fmt: str) -> None:
    path = _save(tmp_path / f"pal.{fmt.lower()}", _palette_image(1))
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(
        _rgb_pixels(load_image(path))[0], [[255, 0, 0], [255, 255, 255], [10, 200, 30]]
    )


def test_rgba_over_white(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    path = _save(tmp_path / "alpha.png", Image.fromarray(rgba, mode="RGBA"))
    pixels = _rgb_pixels(load_image(path))[0].astype(int)
    np.testing.assert_array_equal(pixels[0], [255, 255, 255])  # colour under alpha 0 is ignored
    np.testing.assert_array_equal(pixels[1], [10, 20, 30])
    np.testing.assert_allclose(pixels[2], [127, 127, 127], atol=1)


def test_la_over_white(tmp_path: Path) -> None:
    la = np.array([[[100, 0], [100, 255]]], dtype=np.uint8)
    path = _save(tmp_path / "grey_alpha.png", Image.fromarray(la, mode="LA"))
    assert Image.open(path).mode == "LA"
    np.testing.assert_array_equal(_rgb_pixels(load_image(path))[0], [[255, 255, 255], [100, 100, 100]])


def test_rgb_colour_key_transparency(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[[0, 0, 0], [9, 8, 7]]], dtype=np.uint8))
    path = _save(tmp_path / "key.png", image, transparency=(0, 0, 0))
    np.testing.assert_array_equal(_rgb_pixels(load_image(path))[0], [[255, 255, 255], [9, 8, 7]])


_SIXTEEN_BIT = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
_SIXTEEN_BIT_AS_8 = [0, 1, 128, 255]


@pytest.mark.parametrize(
    ("name", "mode_on_disk", "image"),
    [
        ("png16.png", "I;16", Image.fromarray(_SIXTEEN_BIT)),
        ("big_endian.tif", "I;16B", Image.frombytes("I;16B", (4, 1), _SIXTEEN_BIT.astype(">u2").tobytes())),
        ("pgm16.pgm", "I", Image.fromarray(_SIXTEEN_BIT)),
        ("int32.tif", "I", Image.fromarray(_SIXTEEN_BIT.astype(np.int32))),
    ],
)
def test_sixteen_bit_grey_divided_by_257(
    tmp_path: Path, name: str, mode_on_disk: str, image: Image.Image
) -> None:
    path = _save(tmp_path / name, image)
    assert Image.open(path).mode == mode_on_disk
    pixels = _rgb_pixels(load_image(path))
    assert pixels.shape == (1, 4, 3)
    np.testing.assert_array_equal(pixels[0, :, 0], _SIXTEEN_BIT_AS_8)
    np.testing.assert_array_equal(pixels[0, :, 0:1].repeat(3, axis=1), pixels[0])


def test_int32_outside_sixteen_bits_is_clipped(tmp_path: Path) -> None:
    path = _save(tmp_path / "wide.tif", Image.fromarray(np.array([[-5, 70_000]], dtype=np.int32)))
    np.testing.assert_array_equal(_rgb_pixels(load_image(path))[0, :, 0], [0, 255])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0, 0.25], [0, 128, 255, 64]),  # all within [0, 1]: scaled by 255
        ([-5.0, 100.4, 300.0, float("nan")], [0, 100, 255, 0]),  # exceeds 1: already 0..255, clipped
    ],
    ids=["unit-range", "byte-range"],
)
def test_float_mode(tmp_path: Path, values: list[float], expected: list[int]) -> None:
    path = _save(tmp_path / "float.tif", Image.fromarray(np.array([values], dtype=np.float32)))
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(_rgb_pixels(load_image(path))[0, :, 0], expected)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    image = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (8, 0, 16, 8))
    path = _save(tmp_path / "print.jpg", image, quality=95)
    assert Image.open(path).mode == "CMYK"
    pixels = _rgb_pixels(load_image(path)).astype(int)
    np.testing.assert_allclose(pixels[4, 2], [255, 255, 255], atol=3)  # no ink -> white
    np.testing.assert_allclose(pixels[4, 13], [255, 0, 0], atol=3)  # magenta + yellow -> red


def _exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_exif_orientation_png_exact(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    path = _save(tmp_path / "rotated.png", image, exif=_exif_orientation(6))
    upright = load_image(path)
    # Orientation 6: the stored picture must be turned 90 degrees clockwise to display.
    assert upright.size == (10, 20)
    assert upright.getpixel((9, 0)) == (255, 0, 0)
    assert upright.getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_jpeg(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # left half red, right half blue
    path = _save(tmp_path / "phone.jpg", image, exif=_exif_orientation(6), quality=95)
    pixels = _rgb_pixels(load_image(path)).astype(int)
    assert pixels.shape == (20, 10, 3)
    np.testing.assert_allclose(pixels[4, 5], [255, 0, 0], atol=40)  # left half is now on top
    np.testing.assert_allclose(pixels[15, 5], [0, 0, 255], atol=40)


# -- iter_images ---------------------------------------------------------------------------------


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_image_suffixes() -> None:
    expected = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    assert IMAGE_SUFFIXES == expected


def test_iter_images_folder(tmp_path: Path) -> None:
    root = tmp_path / "shots"
    _touch(
        root / "b.PNG",
        root / "a.jpg",
        root / "notes.txt",
        root / ".hidden.jpg",
        root / ".cache" / "thumb.jpg",
        root / "sub" / "d.jpeg",
        root / "sub" / ".f.png",
        root / "sub" / "deeper" / "e.TIFF",
        root / "z.webp",
    )
    assert iter_images([root]) == [
        root / "a.jpg",
        root / "b.PNG",
        root / "sub" / "d.jpeg",
        root / "sub" / "deeper" / "e.TIFF",
        root / "z.webp",
    ]
    assert iter_images([root], recursive=False) == [root / "a.jpg", root / "b.PNG", root / "z.webp"]


def test_iter_images_keeps_explicit_paths_in_order(tmp_path: Path) -> None:
    _touch(tmp_path / "folder" / "x.jpg", tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    given = [tmp_path / "notes.txt", str(tmp_path / "folder"), empty, tmp_path / "missing.jpg"]
    expected = [tmp_path / "notes.txt", tmp_path / "folder" / "x.jpg", tmp_path / "missing.jpg"]
    assert iter_images(given) == expected
    assert iter_images([empty]) == []


def test_iter_images_unlistable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    _touch(locked / "a.jpg")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root: fake the refusal
        real_scandir = os.scandir

        def refuse(path):  # type: ignore[no-untyped-def]
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", refuse)
    try:
        with pytest.raises(DataError, match="cannot list folder: permission denied") as caught:
            iter_images([locked])
        assert str(caught.value).startswith(f"{locked}: ")
    finally:
        locked.chmod(0o755)


# -- atomic writes ---------------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "out.bin"
    assert atomic_write(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(str(target), "é\r\n")  # str is UTF-8, newlines untouched
    assert target.read_bytes() == b"\xc3\xa9\r\n"
    assert os.listdir(target.parent) == ["out.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_current_umask()  # not tempfile's 0600


def test_atomic_write_keeps_existing_mode(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize("failing", ["fsync", "replace"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_atomic_write_failure_leaves_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, code: int
) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")

    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, failing, fail)
    expected: dict[int, tuple[type[Exception], str]] = {
        errno.ENOSPC: (OutputError, (rf"^{re.escape(str(target))}: no space left on /\S* \(11 bytes needed\) "
                                     r"\(free some space and run again\)$")),
        errno.EDQUOT: (OutputError, r": disk quota exceeded on /\S* \(11 bytes needed\)"),
        errno.EIO: (OSError, "Input/output error"),  # not the user's to fix: it stays an OSError
    }
    kind, message = expected[code]
    with pytest.raises(kind, match=message):
        atomic_write(target, "new content")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.html"]


def test_shown_path_replaces_bytes_that_are_not_utf8() -> None:
    from convscope.imageio import shown_path, shown_text

    assert shown_path(Path(os.fsdecode(b"/photos/caf\xe9.jpg"))) == "/photos/caf\ufffd.jpg"
    assert shown_path(b"caf\xe9 \xc3\xa9.jpg") == "caf\ufffd \u00e9.jpg"
    assert shown_path("caf\u00e9.jpg") == "caf\u00e9.jpg"  # valid names are untouched
    assert shown_text("a\ud800b") == "a\ufffd\ufffd\ufffdb"  # a surrogate that stands for no byte
    shown_text(os.fsdecode(b"\xff\xfe")).encode("utf-8")  # always encodable


def test_atomic_path_success(tmp_path: Path) -> None:
    target = tmp_path / "maps" / "heat.png"
    with atomic_path(target) as temp:
        assert temp.parent == target.parent
        assert temp.name.startswith(".heat.png.") and temp.suffix == ".tmp"
        Image.new("RGB", (3, 2), "blue").save(temp, format="PNG")
        assert not target.exists()
    assert Image.open(target).size == (3, 2)
    assert os.listdir(target.parent) == ["heat.png"]


def test_atomic_path_failure_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "weights.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_path(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.pt"]


@pytest.mark.parametrize(
    "image",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        np.arange(8, dtype=np.uint8).reshape(2, 4),
        np.arange(24, dtype=np.uint8).reshape(2, 4, 3)[:, ::-1],  # not contiguous
    ],
    ids=["rgb", "grey", "strided"],
)
def test_save_png_array(tmp_path: Path, image: np.ndarray) -> None:
    path = save_png(tmp_path / "out" / "a.png", image)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        np.testing.assert_array_equal(np.asarray(saved), image)


def test_save_png_pil(tmp_path: Path) -> None:
    source = _noise_rgb()
    path = save_png(tmp_path / "b.png", source)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(source))
    assert os.listdir(tmp_path) == ["b.png"]


def test_save_png_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="uint8"):
        save_png(tmp_path / "f.png", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=re.escape("(H, W) or (H, W, 3)")):
        save_png(tmp_path / "f.png", np.zeros((2, 2, 4), dtype=np.uint8))
    assert not list(tmp_path.iterdir())


# -- read_ahead ----------------------------------------------------------------------------------


def test_read_ahead_keeps_order_and_yields_bad_files_in_place(tmp_path: Path) -> None:
    import threading

    from convscope.imageio import read_ahead

    good = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (4 + i, 3), (i, 0, 0)).save(path)
        good.append(path)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    paths = [*good[:3], bad, *good[3:]]
    got = list(read_ahead(paths, load_image, depth=2))
    assert [p for p, _ in got] == paths
    assert isinstance(got[3][1], ImageError) and "bad.png" in str(got[3][1])
    assert [v.size for p, v in got if p != bad] == [(4 + i, 3) for i in range(7)]
    assert not any(t.name == "convscope-read-ahead" for t in threading.enumerate())


def test_read_ahead_raises_other_errors_in_the_caller_and_stops_when_closed(tmp_path: Path) -> None:
    import threading

    from convscope.imageio import read_ahead

    def read(path: Path) -> str:
        if path.name == "boom":
            raise RuntimeError("reader failed on boom")
        return path.name

    with pytest.raises(RuntimeError, match="reader failed on boom"):
        list(read_ahead([Path("a"), Path("boom"), Path("c")], read))
    calls: list[str] = []

    def counting(path: Path) -> str:
        calls.append(path.name)
        return path.name

    stream = read_ahead((Path(str(i)) for i in range(10_000)), counting, depth=4)
    assert next(stream) == (Path("0"), "0")
    stream.close()  # the reader stops: it does not go on through the 10,000 paths
    assert len(calls) < 100
    assert not any(t.name == "convscope-read-ahead" for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth"):
        next(read_ahead([], read, depth=0))
