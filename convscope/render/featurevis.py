"""Feature visualisations as pictures: one per image, and a captioned grid of all units.

Pure numpy/PIL: the images come in as ``(N, C, H, W)`` pixels in ``[0, 1]`` (a
``methods.featurevis.FeatureVisualization``); nothing runs a model here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convscope.render.colormaps import as_array
from convscope.render.figures import caption_lines, labelled_grid, titled

# Tiles of the grid are at least this many pixels wide (a 64-pixel run is enlarged nearest).
GRID_MIN_SIDE = 96


def unit_picture(images: Any, index: int) -> np.ndarray:
    """Image ``index`` of an ``(N, C, H, W)`` batch in ``[0, 1]`` as ``(H, W, 3)`` uint8 (grey
    images repeated over the three colours)."""
    array = as_array(images[index])
    pixels = np.clip(np.rint(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels)


def unit_labels(result: Any) -> list[str]:
    """Under each tile: the unit (``#12``, or ``#12.3`` for a unit's fourth diverse image) and its
    final objective."""
    per_unit = int(getattr(result, "images_per_unit", 1))
    finals = as_array(result.final).tolist()
    labels = []
    for i, (unit, value) in enumerate(zip(result.units, finals, strict=True)):
        name = f"#{unit}" if per_unit == 1 else f"#{unit}.{i % per_unit}"
        labels.append(f"{name}: {value:.3g}")
    return labels


def describe_settings(result: Any) -> str:
    """One caption line with what the images are the optimum of."""
    settings = result.settings
    parts = [
        f"{settings['steps']} Adam steps (lr {settings['lr']:g})",
        f"objective {result.objective}" + (f" ({settings['diversity']} images per unit, weight "
                                           f"{settings['diversity_weight']:g})" if result.objective == "diversity"
                                           else ""),
        f"{settings['parameterization']} parameterisation" + (", decorrelated colours" if settings["decorrelate"]
                                                               else ""),
        f"transforms {settings['transforms']}",
        f"{settings['size']} px, seed {settings['seed']}",
    ]
    return "; ".join(parts)


def featurevis_figure(result: Any, model: Any = None, columns: int | None = None) -> np.ndarray:
    """Every image of the result in one grid, each labelled with its unit and final objective,
    under a caption naming the model, the layer, the steps and the objective.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    count = int(result.images.shape[0])
    tiles = [unit_picture(result.images, i) for i in range(count)]
    per_unit = int(getattr(result, "images_per_unit", 1))
    if columns is None:
        # A unit's diverse images side by side on one row; otherwise a near-square grid.
        columns = per_unit if per_unit > 1 else math.ceil(math.sqrt(count))
    grid = labelled_grid(tiles, unit_labels(result), columns=columns, min_side=GRID_MIN_SIDE)
    negative = " (the objective is minus the channel mean)" if result.objective == "negative" else ""
    lines = caption_lines(model=model, layer=result.layer, details=(
        describe_settings(result),
        f"under each image: the unit and its final objective without transforms{negative}",
    ))
    units = len(dict.fromkeys(result.units))
    return titled(grid, f"Feature visualisation of {result.layer}, {units} unit{'s' if units != 1 else ''}",
                  lines)
