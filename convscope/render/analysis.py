"""Plots and tables of the analyses: invariance curves, correspondence table, quality scores,
the sanity-check panels (Adebayo et al. Fig. 2).

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
    from convscope.analysis.sanity import Randomization

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


MODE_TITLES = {
    "top-down": "cascading randomisation, top down",
    "bottom-up": "cascading randomisation, bottom up",
    "independent": "independent layer randomisation",
}
SIMILARITY_TITLES = {"spearman": "Spearman rank correlation", "ssim": "SSIM", "hog": "HOG similarity (Pearson)"}


def quality_table(results: Mapping[str, QualityResult], flags: Mapping[str, Sequence[str]]) -> str:
    """Methods x metrics, mean ± std over images; ``flags[name]`` lists metrics where the
    method does not beat the random map (marked ``*``)."""
    header = ["method", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
              "randomisation: last Spearman", "last SSIM", "last HOG"]
    rows = []
    for name, result in results.items():
        flagged = set(flags.get(name, ()))
        cells = [name]
        for metric, curves in (("deletion", result.deletion), ("insertion", result.insertion)):
            cells.append("-" if curves is None else _stat(curves.auc) + (" *" if metric in flagged else ""))
        cascade = result.randomization
        if cascade is None:
            cells += ["-", "-", "-"]
        else:
            cells += [f"{float(nanmean(cascade.similarity(key)[:, -1])):.3f}" for key in ("spearman", "ssim", "hog")]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    first = next((r.randomization.mode for r in results.values() if r.randomization is not None), None)
    notes = "* does not beat the random map on this metric (mean over images)"
    if first is not None:
        notes += f"\nrandomisation columns: {MODE_TITLES[first]}, every step random (absolute maps compared)"
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


def sanity_table(results: Mapping[str, QualityResult]) -> str:
    """Per method and randomisation mode: each step's mean ± std over images of each similarity."""
    lines: list[str] = []
    for name, result in results.items():
        for mode, run in result.randomizations.items():
            lines.append(f"{name}: {MODE_TITLES[mode]}")
            header = ["step", *(SIMILARITY_TITLES[k].split(" (")[0] for k in ("spearman", "ssim", "hog"))]
            rows = [[layer, *(_mean_std(run.similarity(key)[:, k]) for key in ("spearman", "ssim", "hog"))]
                    for k, layer in enumerate(run.layers)]
            lines += ["  " + text for text in _aligned(header, rows)] + [""]
    return "\n".join(lines)


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A header, a rule and the rows, in columns as wide as their widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = ["-" * w for w in widths]
    return ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in [header, rule, *rows]]


def _mean_std(values: Any) -> str:
    array = as_array(values)
    kept = array[~np.isnan(array)]
    return f"{kept.mean():.3f} ± {kept.std():.3f}" if kept.size else "nan"


def randomization_figure(results: Mapping[str, QualityResult]) -> np.ndarray:
    """Each similarity against the original map as layers are re-initialised: one row per
    randomisation mode, one column per similarity, one line per method (mean over images)."""
    modes = list(dict.fromkeys(mode for r in results.values() for mode in r.randomizations))
    keys = ("spearman", "ssim", "hog")
    fig, axes = _figure(len(keys), max(1, len(modes)), width=5.2)
    for row, mode in enumerate(modes):
        for ax, key in zip(axes[row], keys, strict=True):
            labels: tuple[str, ...] = ()
            for index, (name, result) in enumerate(results.items()):
                run = result.randomizations.get(mode)
                if run is None:
                    continue
                labels = run.layers
                ax.plot(np.arange(len(labels)), nanmean(run.similarity(key), axis=0), marker="o",
                        color=f"C{index % 10}", linewidth=1.4, label=name)
            ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{MODE_TITLES[mode]}: {SIMILARITY_TITLES[key]}", fontsize=9)
            ax.set_xlabel("re-initialised layer" if mode == "independent" else "re-initialised down to"
                          if mode == "top-down" else "re-initialised up to")
            ax.set_ylim(-0.5 if key != "ssim" else -0.05, 1.05)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    return figure_array(fig)


PANEL_TILE = 112
PANEL_LABEL = 116
PANEL_GAP = 4


def _absolute_tile(values: Any, side: int) -> np.ndarray:
    """A map as its absolute value divided by its largest, grey (white: the largest), ``side`` pixels high."""
    array = np.abs(as_array(values))
    peak = float(array.max()) if array.size else 0.0
    grey = np.zeros(array.shape, dtype=np.uint8) if peak <= 0 else np.rint(array / peak * 255.0).astype(np.uint8)
    picture = Image.fromarray(grey)
    width = max(1, round(array.shape[1] * side / array.shape[0]))
    return np.asarray(picture.resize((width, side), Image.Resampling.BILINEAR).convert("RGB"))


def sanity_panel(photo: np.ndarray, originals: Mapping[str, Any], runs: Mapping[str, Randomization], index: int = 0,
                 *, title: str = "") -> np.ndarray:
    """Adebayo et al.'s Fig. 2 for image ``index``: one row per method, the photo, the original
    map, then the map after each randomisation step (columns: the steps of the first run; in a
    cascade every earlier step stays random), each as its normalised absolute map, with its
    Spearman rank correlation with the original under it.

    Args:
        photo: ``(H, W, 3)`` uint8 the network's view of the image.
        originals: method -> ``(N, H, W)`` the maps on the trained model.
        runs: method -> its ``Randomization`` in one mode (the same steps for every method).
    """
    names = [n for n in originals if n in runs]
    steps = next(iter(runs.values())).layers if runs else ()
    mode = next(iter(runs.values())).mode if runs else "top-down"
    side, gap, label = PANEL_TILE, PANEL_GAP, PANEL_LABEL
    columns = 2 + len(steps)
    header, caption = 34, 14
    tiles_width = label + columns * (side + gap)
    sheet = Image.new("RGB", (tiles_width + gap, header + max(1, len(names)) * (side + caption + gap) + gap),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 2), title or f"{MODE_TITLES[mode]} (normalised absolute maps; rho: Spearman rank correlation with the original)",
              fill=(0, 0, 0))
    heads = ["photo", "original", *(step if mode == "independent" else ("+ " if k else "") + step
                                      for k, step in enumerate(steps))]
    for c, head in enumerate(heads):
        draw.text((label + c * (side + gap), 18), head[:18], fill=(0, 0, 0))
    photo_tile = Image.fromarray(photo).resize((side, side), Image.Resampling.BILINEAR)
    for r, name in enumerate(names):
        top = header + r * (side + caption + gap)
        draw.text((gap, top + side // 2 - 6), name[:18], fill=(0, 0, 0))
        sheet.paste(photo_tile, (label, top))
        run = runs[name]
        maps = [originals[name][index], *run.maps[index]]
        for c, values in enumerate(maps):
            tile = Image.fromarray(_absolute_tile(values, side)).crop((0, 0, side, side))
            left = label + (c + 1) * (side + gap)
            sheet.paste(tile, (left, top))
            if c:
                rho = float(run.spearman[index, c - 1])
                draw.text((left + 2, top + side + 1), f"rho {rho:.2f}" if math.isfinite(rho) else "rho nan",
                          fill=(0, 0, 0))
    return np.asarray(sheet)


def quantus_table(faithfulness: Mapping[str, Any]) -> str:
    """The Quantus protocol's mean AUC per method and metric (``QuantusFaithfulness.as_dict()``)."""
    methods = faithfulness.get("methods", {})
    metrics = list(dict.fromkeys(m for per in methods.values() for m in per))
    header = ["method", *(f"{m} mean AUC" for m in metrics)]
    rows = [[name, *(f"{per[m]['mean_auc']:.4f}" if m in per else "-" for m in metrics)] for name, per in methods.items()]
    return "\n".join(["Quantus protocol", *_aligned(header, rows)]) + "\n"
