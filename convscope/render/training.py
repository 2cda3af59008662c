"""Pictures of training results: feature evolution (Fig. 4) and confusion matrices.

Pure rendering: tensors/arrays in, ``(H, W, 3)`` uint8 out; no model runs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from convscope.render.colormaps import as_array, colorize, to_rgb_uint8
from convscope.render.figures import Line, font, labelled_grid, line_height, text_block, titled
from convscope.render.grids import filter_tiles, tile

if TYPE_CHECKING:
    from convscope.training.snapshots import Snapshot

_PAD = 2
_MIN_SIDE = 64
MIN_WIDTH = 600  # training pictures stay readable when a report shrinks them


def caption(block: np.ndarray, text: str) -> np.ndarray:
    """``text`` wrapped (never cut) in a band under ``block``."""
    width = max(block.shape[1], 300)
    band = text_block(None, [Line(text)], width)
    canvas = np.full((block.shape[0], width, 3), 255, np.uint8)
    canvas[:, : block.shape[1]] = block
    return np.concatenate([canvas, band], axis=0)


MIN_CROP = 7


def crop_side(boxes: Sequence[object], height: int) -> int:
    """One crop size for a layer: its largest receptive-field box (at least ``MIN_CROP``), capped by the image."""
    sides = [max(int(b[2]) - int(b[0]), int(b[3]) - int(b[1])) for box in boxes for b in as_array(box).reshape(-1, 4)]
    return min(height, max([MIN_CROP, *sides]))


def projection_tile(projection: object, box: object | None = None, side: int | None = None) -> np.ndarray:
    """``(C, H, W)`` deconvnet projection -> uint8 RGB, zero mapped to mid-grey (sign kept).

    With ``box`` (top, left, bottom, right) and ``side``, the projection is first cropped to a
    ``side`` x ``side`` square centred on the box (shifted to stay inside the image).
    """
    array = as_array(projection)
    if box is not None and side is not None:
        top, left, bottom, right = (int(v) for v in as_array(box).reshape(4))
        height, width = array.shape[-2:]
        y = min(max(0, (top + bottom) // 2 - side // 2), max(0, height - side))
        x = min(max(0, (left + right) // 2 - side // 2), max(0, width - side))
        array = array[:, y : y + side, x : x + side]
    scale = float(np.abs(array).max())
    shown = array / (2.0 * scale) + 0.5 if scale > 0 else np.full_like(array, 0.5)
    return to_rgb_uint8(shown)


def _header(width: int, columns: int, labels: Sequence[str], cell: int) -> np.ndarray:
    face = font(12)
    band = Image.new("RGB", (width, line_height(face) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for c, text in enumerate(labels):
        draw.text((_PAD + c * (cell + _PAD) + 1, 1), text, font=face, fill=(0, 0, 0))
    return np.asarray(band)


def _stack(blocks: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    width = max(b.shape[1] for b in blocks)
    rows = []
    for block in blocks:
        padded = np.full((block.shape[0] + gap, width, 3), 255, np.uint8)
        padded[: block.shape[0], : block.shape[1]] = block
        rows.append(padded)
    return np.concatenate(rows, axis=0)


def _cell_width(sample: np.ndarray) -> int:
    side = min(sample.shape[:2])
    factor = max(1, -(-_MIN_SIDE // max(1, side)))
    return sample.shape[1] * factor


def evolution_picture(snapshots: Sequence[Snapshot]) -> np.ndarray:
    """One block per conv stage: a row per followed channel, a column per epoch (paper Fig. 4).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if not snapshots:
        raise ValueError("no snapshots to draw")
    epochs = [s.epoch for s in snapshots]
    blocks = []
    for layer in snapshots[-1].layers:
        present = [s for s in snapshots if layer in s.projections]
        if len(present) != len(snapshots):
            continue
        channels = snapshots[-1].channels[layer].tolist()
        side = crop_side([s.boxes[layer] for s in snapshots], snapshots[-1].projections[layer].shape[-2])
        tiles = [
            projection_tile(s.projections[layer][k], s.boxes[layer][k], side)
            for k in range(len(channels))
            for s in snapshots
        ]
        grid = tile(tiles, columns=len(snapshots), pad=_PAD, min_side=_MIN_SIDE)
        cell = _cell_width(tiles[0])
        header = _header(grid.shape[1], len(snapshots), [f"epoch {e}" for e in epochs], cell)
        block = np.concatenate([header, grid], axis=0)
        blocks.append(caption(block, f"{layer}: channels {', '.join(str(c) for c in channels)} ({side}x{side} px crops)"))
    if not blocks:
        raise ValueError("the snapshots share no layer")
    return titled(_stack(blocks), "Feature evolution during training (Zeiler & Fergus Fig. 4)", [Line(
        "per stage: a row per followed channel, a column per epoch; deconvnet projection of the channel's "
        "strongest activation, cropped to its receptive field; grey = 0")], min_width=MIN_WIDTH)


def filters_picture(snapshot: Snapshot) -> np.ndarray:
    tiles = filter_tiles(snapshot.filters, snapshot.strongest_input.tolist())
    return tile(tiles, pad=2, min_side=48)


def filters_evolution_picture(snapshots: Sequence[Snapshot]) -> np.ndarray:
    """The first-layer filters at each snapshot epoch, side by side, at least ``MIN_WIDTH`` px."""
    grids = [filters_picture(s) for s in snapshots]
    columns = min(len(grids), 6)
    side = max(1, (MIN_WIDTH // columns) - 16)
    grid = labelled_grid(grids, [f"epoch {s.epoch}" for s in snapshots], columns=columns, min_side=side, gap=12)
    return titled(grid, "First-layer filters during training", [Line(
        "each filter min-max scaled on its own; RGB kernels in colour, else the strongest input channel")],
        min_width=MIN_WIDTH)


def snapshot_picture(snapshot: Snapshot) -> np.ndarray:
    """One epoch: the first-layer filters, then each stage's projections in a row."""
    blocks = [caption(filters_picture(snapshot), f"epoch {snapshot.epoch}: first-layer filters")]
    for layer in snapshot.layers:
        side = crop_side([snapshot.boxes[layer]], snapshot.projections[layer].shape[-2])
        tiles = [projection_tile(p, b, side) for p, b in zip(snapshot.projections[layer], snapshot.boxes[layer], strict=True)]
        labels = [str(c) for c in snapshot.channels[layer].tolist()]
        blocks.append(caption(tile(tiles, labels=labels, columns=len(tiles), pad=_PAD, min_side=_MIN_SIDE), layer))
    return _stack(blocks)


def confusion_picture(matrix: object, categories: Sequence[str], *, cell: int = 36) -> np.ndarray:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), with counts.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    counts = np.asarray(as_array(matrix), dtype=np.float64)
    k = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    colors = colorize(share, "Blues")
    names = [f"{i} {str(c)[:14]}" for i, c in enumerate(categories)]
    margin = 10 + 6 * max((len(n) for n in names), default=1)
    top = 20
    size = (max(margin + k * cell + 8, margin + 300), top + k * cell + 24)
    picture = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for i in range(k):
        for j in range(k):
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=tuple(int(v) for v in colors[i, j]))
            text = str(int(counts[i, j]))
            ink = (255, 255, 255) if share[i, j] > 0.5 else (0, 0, 0)
            box = draw.textbbox((0, 0), text)
            draw.text((x0 + (cell - box[2]) // 2, y0 + (cell - box[3]) // 2), text, fill=ink)
    for i, name in enumerate(names):
        draw.text((2, top + i * cell + cell // 2 - 5), name, fill=(0, 0, 0))
        # Column labels: index only (names do not fit above narrow cells); the row names give the key.
        draw.text((margin + i * cell + cell // 2 - 3, top - 14), str(i), fill=(0, 0, 0))
    draw.text((margin, top + k * cell + 6), "rows: true class; columns: predicted class index", fill=(0, 0, 0))
    return np.asarray(picture)
