"""Method results -> finished pictures (uint8 RGB arrays). Pure; no files, no models."""

from __future__ import annotations

from typing import Any

import numpy as np

from convscope.render.colormaps import as_array, percentile_scale, to_rgb_uint8
from convscope.render.grids import feature_tiles, filter_tiles, strip, tile
from convscope.render.overlay import overlay
from convscope.types import ActivationMaps, FeatureMaps, Filters


def display_image(preprocess: Any, batch: Any, index: int = 0) -> np.ndarray:
    """The network's view of image ``index`` of a normalised batch, as ``(H, W, 3)`` uint8."""
    return to_rgb_uint8(preprocess.to_display(batch[index : index + 1])[0])


def activation_pictures(photo: np.ndarray, result: ActivationMaps, index: int = 0) -> dict[str, np.ndarray]:
    """One overlay (0.6 photo + 0.4 jet map) per layer for image ``index``."""
    return {name: overlay(photo, result.maps[name][index]) for name in result.layers}


def activation_strip(photo: np.ndarray, result: ActivationMaps, index: int = 0) -> np.ndarray:
    """The photo then every layer's overlay, captioned, in one row."""
    pictures = activation_pictures(photo, result, index)
    return strip([photo, *pictures.values()], ["input", *pictures.keys()])


def feature_grid(result: FeatureMaps, index: int = 0, columns: int | None = None) -> np.ndarray:
    """The selected channels of image ``index`` as grayscale tiles captioned with the channel index."""
    tiles, labels = feature_tiles(result.maps[index], result.channels.tolist())
    return tile(tiles, labels=labels, columns=columns)


def filter_grid(result: Filters, columns: int | None = None) -> np.ndarray:
    """Each filter as a tile (RGB for first layers), captioned with its index."""
    tiles = filter_tiles(result.normalized, result.strongest_input.tolist())
    return tile(tiles, labels=[str(i) for i in range(len(tiles))], columns=columns, min_side=32)


def signed_picture(attribution: Any) -> np.ndarray:
    """``(C, H, W)`` signed attribution -> ``(H, W, 3)`` uint8: zero is mid-grey, and the
    99.5th percentile of ``|a|`` reaches black/white (how deconvnet and guided-backprop images
    are usually shown; one stray pixel does not wash the rest out)."""
    array = as_array(attribution)
    scale = float(np.percentile(np.abs(array), 99.5)) or float(np.abs(array).max())
    if scale == 0.0:
        return to_rgb_uint8(np.full(array.shape, 0.5, np.float32))
    return to_rgb_uint8(np.clip(0.5 + array / (2.0 * scale), 0.0, 1.0))


def magnitude_picture(values: Any) -> np.ndarray:
    """``(H, W)`` non-negative map -> ``(H, W, 3)`` uint8 grey, percentile-scaled."""
    return to_rgb_uint8(percentile_scale(values, 0.0, 99.5))
