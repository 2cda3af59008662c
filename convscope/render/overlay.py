"""Heat maps over photos."""

from __future__ import annotations

from typing import Any

import numpy as np

from convscope.render.colormaps import as_array, colorize

IMAGE_WEIGHT = 0.6
MAP_WEIGHT = 0.4


def overlay(image: np.ndarray, heat: Any, *, cmap: str = "jet", map_weight: float = MAP_WEIGHT) -> np.ndarray:
    """Blend a colour-mapped ``(H, W)`` map in ``[0, 1]`` over an ``(H, W, 3)`` uint8 photo.

    Returns:
        ``(H, W, 3)`` uint8: ``(1 - map_weight) * photo + map_weight * colours`` (0.6 / 0.4 by default).
    """
    heat_array = as_array(heat)
    if heat_array.shape != image.shape[:2]:
        raise ValueError(f"map shape {heat_array.shape} does not match image {image.shape[:2]}")
    colours = colorize(heat_array, cmap).astype(np.float32)
    blended = (1.0 - map_weight) * image.astype(np.float32) + map_weight * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
