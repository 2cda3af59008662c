"""Every PNG convscope writes is encoded at one measured zlib level, and reads back exactly."""

from __future__ import annotations

import io

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
    reference = io.BytesIO()
    Image.fromarray(picture).save(reference, format="PNG", compress_level=atomic.PNG_COMPRESS_LEVEL)
    assert atomic.png_bytes(picture) == reference.getvalue()
    assert figures.png_bytes(picture) == reference.getvalue()
    # Pillow's default level (6) gives other bytes: the level is really passed
    default = io.BytesIO()
    Image.fromarray(picture).save(default, format="PNG")
    assert atomic.PNG_COMPRESS_LEVEL == 6 or default.getvalue() != reference.getvalue()
