"""Scalar maps -> uint8 RGB, deterministic."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np


def as_array(values: Any) -> np.ndarray:
    """Tensor or array-like -> float32 numpy array (CPU, detached)."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


@cache
def _lut(name: str) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def colorize(values: Any, cmap: str = "jet") -> np.ndarray:
    """``(H, W)`` values in ``[0, 1]`` (clipped) -> ``(H, W, 3)`` uint8 through a matplotlib colour map."""
    array = np.nan_to_num(as_array(values), nan=0.0)
    index = np.clip(np.rint(np.clip(array, 0.0, 1.0) * 255.0), 0, 255).astype(np.intp)
    return _lut(cmap)[index]


def to_gray_uint8(values: Any, *, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Min-max (or ``low``..``high``) scale a 2-D map to uint8 grayscale."""
    array = as_array(values)
    lo = float(array.min()) if low is None else low
    hi = float(array.max()) if high is None else high
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.clip(np.rint((array - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """``(3, H, W)`` or ``(1, H, W)`` in ``[0, 1]`` (tensor or array) -> ``(H, W, 3)`` uint8."""
    array = as_array(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def percentile_scale(values: Any, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the ``low``..``high`` percentiles and scale to ``[0, 1]`` (robust to outliers)."""
    array = as_array(values)
    lo, hi = np.percentile(array, [low, high])
    if hi <= lo:
        return np.zeros_like(array)
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0)
