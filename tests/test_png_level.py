"""Every PNG convscope writes is encoded at one measured zlib level, and reads back exactly."""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

from convscope import atomic
from convscope.render import figures


def _photo_like(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.integers(-3, 4, size=(96, 120, 3)), axis=1)
    return np.clip(smooth + 128, 0, 255).astype(np.uint8)


def test_png_round_trips_pixels_exactly_at_the_chosen_level() -> None:
    picture = _photo_like()
    data = atomic.png_bytes(picture)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), picture)
    grey = picture[:, :, 0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(atomic.png_bytes(grey)))), grey)


def test_every_encoder_uses_the_measured_level() -> None:
    picture = _photo_like(1)
    for data in (atomic.png_bytes(picture), figures.png_bytes(picture), atomic.png_bytes(Image.fromarray(picture))):
        checked = Image.open(io.BytesIO(data))
        checked.verify()  # signature, chunk CRCs
        idat = data.index(b"IDAT") + 4
        # the zlib header's FLEVEL bits: 0 for levels 0-1, 1 for 2-5, 2 for 6 (the default), 3 above
        assert atomic.PNG_COMPRESS_LEVEL <= 1 and data[idat] == 0x78 and data[idat + 1] >> 6 == 0
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), picture)


def test_rows_are_up_filtered_and_odd_shapes_round_trip() -> None:
    rng = np.random.default_rng(3)
    for shape in [(1, 1, 3), (1, 7), (5, 1, 3), (17, 33), (64, 3, 3)]:
        picture = rng.integers(0, 256, size=shape, dtype=np.uint8)
        data = atomic.png_bytes(picture)
        back = np.asarray(Image.open(io.BytesIO(data)))
        assert back.shape == picture.shape and np.array_equal(back, picture), shape
    rows = np.frombuffer(zlib.decompress(data[data.index(b"IDAT") + 4:]), np.uint8).reshape(64, 3 * 3 + 1)
    assert (rows[:, 0] == 2).all()  # every row's filter byte says "Up"
    assert np.array_equal(rows[1:, 1:], (picture[1:].astype(int) - picture[:-1]).reshape(63, 9) % 256)
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 4))  # other modes go through Pillow
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(atomic.png_bytes(rgba)))), np.asarray(rgba))
