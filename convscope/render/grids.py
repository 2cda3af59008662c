"""Tiling pictures into grids and strips, with captions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from convscope.render.colormaps import as_array, to_gray_uint8


def _rgb(tile: np.ndarray) -> np.ndarray:
    if tile.ndim == 2:
        return np.repeat(tile[:, :, None], 3, axis=2)
    return tile


def upscale(tile: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlarge so the shorter side is at least ``min_side`` (pixels stay crisp)."""
    h, w = tile.shape[:2]
    factor = max(1, math.ceil(min_side / max(1, min(h, w))))
    if factor == 1:
        return tile
    return np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)


def tile(
    tiles: Sequence[np.ndarray],
    *,
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    pad: int = 2,
    min_side: int = 48,
    background: int = 255,
) -> np.ndarray:
    """Arrange uint8 tiles (``(h, w)`` or ``(h, w, 3)``) in a grid, captioned top-left.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if not tiles:
        raise ValueError("no tiles to arrange")
    prepared = [upscale(_rgb(t), min_side) for t in tiles]
    th = max(t.shape[0] for t in prepared)
    tw = max(t.shape[1] for t in prepared)
    cols = columns or math.ceil(math.sqrt(len(prepared)))
    rows = math.ceil(len(prepared) / cols)
    grid = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), background, np.uint8)
    for i, t in enumerate(prepared):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        grid[y : y + t.shape[0], x : x + t.shape[1]] = t
    if labels:
        picture = Image.fromarray(grid)
        draw = ImageDraw.Draw(picture)
        for i, text in enumerate(labels[: len(prepared)]):
            r, c = divmod(i, cols)
            y, x = pad + r * (th + pad), pad + c * (tw + pad)
            box = draw.textbbox((x + 1, y), text)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((x + 1, y), text, fill=(255, 255, 0))
        grid = np.asarray(picture)
    return grid


def caption(image: np.ndarray, text: str, *, height: int = 14) -> np.ndarray:
    """Add a white band with ``text`` under an ``(H, W, 3)`` uint8 picture."""
    band = Image.new("RGB", (image.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(band).text((2, 1), text, fill=(0, 0, 0))
    return np.concatenate([image, np.asarray(band)], axis=0)


def strip(pictures: Sequence[np.ndarray], labels: Sequence[str], *, pad: int = 4) -> np.ndarray:
    """Captioned pictures side by side in one row."""
    captioned = [caption(p, label) for p, label in zip(pictures, labels, strict=True)]
    return tile(captioned, columns=len(captioned), pad=pad, min_side=1)


def feature_tiles(maps: object, channels: Sequence[int]) -> tuple[list[np.ndarray], list[str]]:
    """``(K, h, w)`` activations -> grayscale uint8 tiles (each scaled to its own range) and captions."""
    array = as_array(maps)
    tiles = [to_gray_uint8(array[k], low=min(0.0, float(array[k].min()))) for k in range(array.shape[0])]
    return tiles, [str(int(c)) for c in channels]


def filter_tiles(normalized: object, strongest_input: Sequence[int]) -> list[np.ndarray]:
    """``(out, in, kh, kw)`` kernels in ``[0, 1]`` -> one tile each: RGB for 3-channel inputs,
    else grayscale of each filter's strongest input channel."""
    array = as_array(normalized)
    out = []
    for k in range(array.shape[0]):
        if array.shape[1] == 3:
            out.append(np.clip(np.rint(array[k].transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8))
        else:
            out.append(to_gray_uint8(array[k, int(strongest_input[k])], low=0.0, high=1.0))
    return out
