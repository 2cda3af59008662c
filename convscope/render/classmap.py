"""Occlusion pictures: grid maps brought to image size, and the categorical class map with
its legend (Zeiler & Fergus Fig. 7 (e)). Pure numpy/PIL; no models."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from convscope.render.colormaps import as_array
from convscope.render.figures import font, line_height

# Distinct colours (Kelly's / tab20-like), cycled when a map shows more classes.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)
OTHER_COLOUR = (40, 40, 40)


def grid_to_image(
    values: Any, origins: tuple[Sequence[int], Sequence[int]], window: int, size: tuple[int, int]
) -> np.ndarray:
    """A ``(rows, cols)`` map of window positions -> ``(H, W)`` float32: each pixel takes the
    mean of the windows covering it (uncovered pixels: the map's mean)."""
    grid = as_array(values)
    height, width = size
    total = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for i, top in enumerate(origins[0]):
        for j, left in enumerate(origins[1]):
            total[top : top + window, left : left + window] += grid[i, j]
            count[top : top + window, left : left + window] += 1
    fallback = float(grid.mean()) if grid.size else 0.0
    return np.where(count > 0, total / np.maximum(count, 1), fallback).astype(np.float32)


def class_colours(classes: Sequence[int], order_by: Any) -> dict[int, tuple[int, int, int]]:
    """Colour per class, the most frequent in ``order_by`` first; past the palette: dark grey."""
    counts = Counter(as_array(order_by).astype(np.int64).ravel().tolist())
    ranked = sorted(classes, key=lambda c: (-counts.get(c, 0), c))
    return {c: (PALETTE[k] if k < len(PALETTE) else OTHER_COLOUR) for k, c in enumerate(ranked)}


def class_map_picture(
    top_class: Any,
    class_names: Mapping[int, str],
    origins: tuple[Sequence[int], Sequence[int]],
    window: int,
    size: tuple[int, int],
    *,
    photo: np.ndarray | None = None,
    highlight: int | None = None,
    photo_weight: float = 0.3,
    legend_width: int = 220,
) -> np.ndarray:
    """The most probable class at each occluder position as flat colours, with a legend.

    Each pixel shows the class of the window position nearest its centre (nearest window
    centre), optionally blended with the photo; the legend on the right lists every class the
    map shows, most frequent first, with its share of positions (``highlight``, the target,
    is marked with ``*``).

    Returns:
        ``(max(H, legend height), W + legend_width, 3)`` uint8.
    """
    classes_grid = as_array(top_class).astype(np.int64)
    height, width = size
    rows = np.asarray(origins[0], np.float64) + window / 2.0
    cols = np.asarray(origins[1], np.float64) + window / 2.0
    row_index = np.abs((np.arange(height) + 0.5)[:, None] - rows[None, :]).argmin(axis=1)
    col_index = np.abs((np.arange(width) + 0.5)[:, None] - cols[None, :]).argmin(axis=1)
    per_pixel = classes_grid[row_index[:, None], col_index[None, :]]

    shown = sorted(set(classes_grid.ravel().tolist()))
    colours = class_colours(shown, classes_grid)
    lut_keys = np.asarray(shown, np.int64)
    lut = np.asarray([colours[c] for c in shown], np.float32)
    picture = lut[np.searchsorted(lut_keys, per_pixel)]
    if photo is not None:
        picture = (1.0 - photo_weight) * picture + photo_weight * photo.astype(np.float32)
    picture = np.clip(np.rint(picture), 0, 255).astype(np.uint8)

    counts = Counter(classes_grid.ravel().tolist())
    total = max(1, classes_grid.size)
    ranked = sorted(shown, key=lambda c: (-counts[c], c))
    face, bold = font(12), font(12, bold=True)
    line = max(14, line_height(face) + 2)
    legend_height = max(height, 6 + line * (len(ranked) + 1))
    legend = Image.new("RGB", (legend_width, legend_height), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    draw.text((6, 2), "most probable class", font=bold, fill=(0, 0, 0))
    for k, c in enumerate(ranked):
        y = 4 + line * (k + 1)
        draw.rectangle((6, y + 1, 18, y + 13), fill=colours[c], outline=(0, 0, 0))
        name = class_names.get(c, f"class {c}")
        mark = "*" if c == highlight else ""
        text = f"{mark}{name[:24]} ({100.0 * counts[c] / total:.0f}%)"
        draw.text((24, y), text, font=face, fill=(0, 0, 0))
    canvas = np.full((legend_height, width + legend_width, 3), 255, np.uint8)
    canvas[:height, :width] = picture
    canvas[:, width:] = np.asarray(legend)
    return canvas
