"""Plots and tables of the analyses: invariance curves, correspondence table, quality scores.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot state, no
display needed) and returned as ``(H, W, 3)`` uint8 arrays; tables are plain text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from convscope.render.colormaps import as_array

if TYPE_CHECKING:
    from convscope.analysis.correspondence import Correspondence
    from convscope.analysis.invariance import InvarianceCurves
    from convscope.analysis.quality import QualityResult

AMOUNT_LABELS = {
    "translate": "vertical shift (pixels of the network input)",
    "scale": "zoom factor",
    "rotate": "rotation (degrees)",
}
PART_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def _figure(columns: int, rows: int = 1, width: float = 4.2, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, height * rows), dpi=100, layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=False)


def figure_array(fig: Any) -> np.ndarray:
    """Render a matplotlib ``Figure`` to ``(H, W, 3)`` uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _panels(curves: InvarianceCurves) -> list[tuple[str, np.ndarray, str]]:
    panels = [(f"{layer}: distance", as_array(curves.distance[layer]), "Euclidean distance") for layer in curves.layers]
    panels.append(("probability of the target class", as_array(curves.probability), "probability"))
    return panels


def _dress(ax: Any, title: str, ylabel: str, transform: str) -> None:
    """Title, axis labels and grid of one invariance panel."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(AMOUNT_LABELS[transform])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def invariance_figure(curves: InvarianceCurves, names: Sequence[str]) -> np.ndarray:
    """The paper's Fig. 5 panels for one transform: one distance panel per layer and the target
    probability, one curve per image (legend: image names)."""
    panels = _panels(curves)
    fig, axes = _figure(len(panels))
    x = np.asarray(curves.amounts)
    for ax, (title, values, ylabel) in zip(axes[0], panels, strict=True):
        for row, name in zip(values, names, strict=True):
            ax.plot(x, row, marker=".", linewidth=1.2, label=name)
        _dress(ax, title, ylabel, curves.transform)
    axes[0][-1].set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"invariance to {curves.transform}", fontsize=11)
    return figure_array(fig)


def invariance_mean_figure(curves: InvarianceCurves) -> np.ndarray:
    """The same panels as :func:`invariance_figure`, as the mean over images with a ±1 std band."""
    panels = _panels(curves)
    fig, axes = _figure(len(panels))
    x = np.asarray(curves.amounts)
    for ax, (title, values, ylabel) in zip(axes[0], panels, strict=True):
        mean, std = values.mean(axis=0), values.std(axis=0)
        ax.plot(x, mean, color="C0", linewidth=1.6, label=f"mean of {values.shape[0]} images")
        ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.25, label="±1 std")
        _dress(ax, title, ylabel, curves.transform)
    axes[0][-1].set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"invariance to {curves.transform}: mean over images", fontsize=11)
    return figure_array(fig)


def correspondence_table(result: Correspondence) -> str:
    """Table 1 of the paper: mean feature sign change ± std, one column per layer."""
    header = ["part", *result.layers]
    rows = []
    for part in result.parts:
        rows.append([part, *(f"{result.parts_delta[layer][part].normalized:.3f} ± {result.parts_delta[layer][part].std:.3f}"
                             for layer in result.layers)])
    if result.random_boxes:
        rows.append([f"random ({len(result.random_boxes)} boxes)",
                     *(f"{result.random[layer].mean:.3f} ± {result.random[layer].std:.3f}" for layer in result.layers)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    notes = (f"mean feature sign change over {result.count} images ({result.count * (result.count - 1)} ordered pairs); "
             "parts: ± std over pairs; random: ± std over boxes; D = "
             + ", ".join(f"{layer} {result.dimensions[layer]}" for layer in result.layers))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows), "", notes]) + "\n"


def parts_picture(images: Sequence[np.ndarray], boxes: Mapping[str, Sequence[Sequence[int]]], *,
                  max_images: int = 16, side: int = 160) -> np.ndarray:
    """The images (``(H, W[, 3])`` uint8) with each part's box drawn, in a grid with a legend."""
    shown = list(images)[:max_images]
    tiles = []
    for index, image in enumerate(shown):
        array = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        scale = side / max(array.shape[:2])
        picture = Image.fromarray(array).resize(
            (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale))), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(picture)
        for colour, part_boxes in zip(PART_COLOURS * 10, boxes.values(), strict=False):
            top, left, bottom, right = part_boxes[index]
            draw.rectangle([left * scale, top * scale, right * scale - 1, bottom * scale - 1], outline=colour, width=2)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
        tiles.append(np.asarray(canvas))
    columns = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / columns)
    gap = 4
    legend_height = 18 * len(boxes) + 6
    sheet = Image.new("RGB", (columns * (side + gap) + gap, rows * (side + gap) + gap + legend_height), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(Image.fromarray(tile), (gap + (i % columns) * (side + gap), gap + (i // columns) * (side + gap)))
    draw = ImageDraw.Draw(sheet)
    y = rows * (side + gap) + gap
    for colour, part in zip(PART_COLOURS * 10, boxes, strict=False):
        draw.rectangle([gap, y + 3, gap + 12, y + 15], outline=colour, width=2)
        draw.text((gap + 18, y + 3), part, fill=(0, 0, 0))
        y += 18
    return np.asarray(sheet)


def nanmean(values: Any, axis: int | None = None) -> Any:
    """Mean ignoring ``nan`` (a constant map has no rank correlation); all-``nan`` gives ``nan``
    without numpy's warning."""
    array = as_array(values)
    counts = np.sum(~np.isnan(array), axis=axis)
    totals = np.nansum(array, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def _stat(values: Any) -> str:
    array = as_array(values)
    return f"{array.mean():.3f} ± {array.std():.3f}"


def quality_table(results: Mapping[str, QualityResult], flags: Mapping[str, Sequence[str]]) -> str:
    """Methods x metrics, mean ± std over images; ``flags[name]`` lists metrics where the
    method does not beat the random map (marked ``*``)."""
    header = ["method", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
              "randomisation: last Spearman", "last SSIM"]
    rows = []
    for name, result in results.items():
        flagged = set(flags.get(name, ()))
        cells = [name]
        for metric, curves in (("deletion", result.deletion), ("insertion", result.insertion)):
            cells.append("-" if curves is None else _stat(curves.auc) + (" *" if metric in flagged else ""))
        cascade = result.randomization
        if cascade is None:
            cells += ["-", "-"]
        else:
            cells += [f"{float(nanmean(cascade.spearman[:, -1])):.3f}",
                      f"{float(nanmean(cascade.ssim[:, -1])):.3f}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    notes = "* does not beat the random map on this metric (mean over images)"
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows), "", notes]) + "\n"


def quality_curves_figure(results: Mapping[str, QualityResult]) -> np.ndarray:
    """Deletion and insertion curves, mean over images, one line per method or baseline."""
    fig, axes = _figure(2)
    for ax, metric in zip(axes[0], ("deletion", "insertion"), strict=True):
        for index, (name, result) in enumerate(results.items()):
            curves = result.deletion if metric == "deletion" else result.insertion
            if curves is None:
                continue
            style = "--" if name in ("random", "edges") else "-"
            mean = as_array(curves.probability).mean(axis=0)
            ax.plot(as_array(curves.fractions), mean, style, color=f"C{index % 10}", linewidth=1.4,
                    label=f"{name} (AUC {float(as_array(curves.auc).mean()):.3f})")
        ax.set_title(f"{metric}: target probability", fontsize=10)
        ax.set_xlabel(f"fraction of pixels {'deleted' if metric == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return figure_array(fig)


def randomization_figure(results: Mapping[str, QualityResult]) -> np.ndarray:
    """Spearman and SSIM against the original map as layers are re-initialised top down."""
    fig, axes = _figure(2, width=5.2)
    for ax, key in zip(axes[0], ("spearman", "ssim"), strict=True):
        labels: tuple[str, ...] = ()
        for index, (name, result) in enumerate(results.items()):
            cascade = result.randomization
            if cascade is None:
                continue
            labels = cascade.layers
            values = as_array(getattr(cascade, key))
            x = np.arange(len(labels))
            ax.plot(x, nanmean(values, axis=0), marker="o", color=f"C{index % 10}", linewidth=1.4, label=name)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"cascading randomisation: {'Spearman rank correlation' if key == 'spearman' else 'SSIM'}", fontsize=10)
        ax.set_xlabel("re-initialised down to (top first)")
        ax.set_ylim(-0.5 if key == "spearman" else -0.05, 1.05)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return figure_array(fig)
