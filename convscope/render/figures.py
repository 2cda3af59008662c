"""Building blocks of self-describing figures: caption strips, colour bars, panels.

Every picture convscope shows a person (CLI files, notebook ``_repr_png_``, the HTML report,
the web app) is composed here from a bare ``(H, W, 3)`` uint8 picture:

* a **caption** on top: what the map is (method), which network and weights (random weights
  get a red warning line: a map of an untrained network explains nothing), the layer (alias
  and module path), the class explained with its probability, and how values were displayed;
* the picture, enlarged by an integer nearest-neighbour factor to at least ``MIN_SIDE`` px so
  28x28 inputs stay crisp and the caption never crowds them;
* a **colour bar** with the real values behind the colours, where the values mean something.

Text is drawn with PIL and the DejaVu fonts matplotlib ships (found on disk, matplotlib is not
imported): fast, and the same glyphs on every machine. Pure numpy/PIL; no model runs here.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from convscope.render.colormaps import colorize

MIN_SIDE = 224
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
WARNING = (190, 20, 20)
TITLE_SIZE = 15
TEXT_SIZE = 13
SMALL_SIZE = 11
MARGIN = 6
RANDOM_WEIGHTS_NOTE = "random weights: an untrained network, the map explains nothing learned"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@cache
def _font_folder() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    return folder if folder.is_dir() else None


@cache
def font(size: int = TEXT_SIZE, *, bold: bool = False, mono: bool = False) -> Font:
    """DejaVu Sans (bold / mono) at ``size`` px; PIL's own font where matplotlib is absent."""
    name = "DejaVuSans" + ("Mono" if mono else "") + ("-Bold" if bold else "") + ".ttf"
    folder = _font_folder()
    if folder is not None and (folder / name).is_file():
        return ImageFont.truetype(str(folder / name), size)
    return ImageFont.load_default(size)


def text_width(text: str, face: Font) -> int:
    return math.ceil(face.getlength(text))


def line_height(face: Font) -> int:
    top, bottom = face.getbbox("Ag|")[1::2]
    return int(bottom - top) + 4


def wrap(text: str, face: Font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px; a word longer than a line is cut by characters."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        trial = f"{current} {word}" if current else word
        if text_width(trial, face) <= width:
            current = trial
            continue
        if current:
            lines.append(current)
        while text_width(word, face) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and text_width(word[:cut], face) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines


# ---------------------------------------------------------------- what a caption says


@dataclass(frozen=True)
class ModelInfo:
    """The network behind a picture: registry name and where its weights came from."""

    name: str
    weights: str

    @property
    def random(self) -> bool:
        return self.weights.startswith("random")

    def describe(self) -> str:
        weights = self.weights
        if weights.startswith("pretrained") or weights == "as given" or self.random:
            return f"{self.name}, {weights} weights" if weights != "as given" else self.name
        return f"{self.name}, weights {Path(weights).name}"


def model_info(model: Any) -> ModelInfo | None:
    """A ``LoadedModel`` (or anything with ``name``/``weights``), a ``ModelInfo`` or ``None``."""
    if model is None or isinstance(model, ModelInfo):
        return model
    if isinstance(model, str):
        return ModelInfo(model, "as given")
    return ModelInfo(str(getattr(model, "name", "model")), str(getattr(model, "weights", "as given")))


@dataclass(frozen=True)
class Line:
    """One caption line; ``warning`` lines are drawn in red."""

    text: str
    warning: bool = False


def layer_text(layer: str, model: Any = None) -> str:
    """``"stage3 (features.3)"`` when ``layer`` is an alias of ``model``, else the name given;
    the reverse (module path given, alias known) reads the same way."""
    stages = dict(getattr(model, "stages", {}) or {})
    if layer in stages:
        return f"{layer} ({stages[layer]})"
    for alias, path in stages.items():
        if path == layer:
            return f"{alias} ({layer})"
    return layer


def caption_lines(
    *,
    model: Any = None,
    layer: str | None = None,
    label: str | None = None,
    class_index: int | None = None,
    probability: float | None = None,
    score: float | None = None,
    details: Sequence[str] = (),
) -> list[Line]:
    """The facts a heat map needs to be read, one ``Line`` each (the title is separate).

    Args:
        model: a ``LoadedModel`` / ``ModelInfo`` (name and weights), or ``None`` when unknown.
        layer: the layer the map comes from (an alias is shown with its module path).
        label, class_index, probability, score: the class explained, its softmax probability
            and (when the probability is unknown) its logit.
        details: further lines (display choices: clipping, normalisation...).
    """
    lines: list[Line] = []
    info = model_info(model)
    if info is not None:
        lines.append(Line(f"model: {info.describe()}"))
    if layer:
        lines.append(Line(f"layer: {layer_text(layer, model)}"))
    if label is not None or class_index is not None:
        text = f"class: {label if label is not None else ''}"
        if class_index is not None:
            text += f" ({class_index})" if label is not None else str(class_index)
        if probability is not None:
            text += f", p = {probability:.3f}"
        elif score is not None:
            text += f", logit {score:.3g}"
        lines.append(Line(text))
    lines.extend(Line(d) for d in details)
    if info is not None and info.random:
        lines.append(Line(RANDOM_WEIGHTS_NOTE, warning=True))
    return lines


def caption_text(title: str, lines: Sequence[Line]) -> str:
    """The caption as plain text (for JSON, alt text and tests)."""
    return "\n".join([title, *(line.text for line in lines)])


# ---------------------------------------------------------------- drawing blocks


def enlarge(picture: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Integer nearest-neighbour enlargement until the shorter side is at least ``min_side``."""
    height, width = picture.shape[:2]
    factor = max(1, math.ceil(min_side / max(1, min(height, width))))
    if factor == 1:
        return picture
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def as_rgb(picture: np.ndarray) -> np.ndarray:
    if picture.ndim == 2:
        return np.repeat(picture[:, :, None], 3, axis=2)
    return picture


def text_block(
    title: str | None, lines: Sequence[Line], width: int, *, title_size: int = TITLE_SIZE,
    size: int = TEXT_SIZE, align: str = "left",
) -> np.ndarray:
    """A white band of ``width`` px with a bold title and wrapped lines (red for warnings)."""
    rows: list[tuple[str, Font, tuple[int, int, int]]] = []
    usable = max(20, width - 2 * MARGIN)
    if title:
        bold = font(title_size, bold=True)
        rows += [(part, bold, INK) for part in wrap(title, bold, usable)]
    regular = font(size)
    for line in lines:
        colour = WARNING if line.warning else INK
        face = font(size, bold=True) if line.warning else regular
        rows += [(part, face, colour) for part in wrap(line.text, face, usable)]
    height = MARGIN + sum(line_height(face) for _, face, _ in rows) + (MARGIN // 2 if rows else 0)
    band = Image.new("RGB", (width, max(1, height)), BACKGROUND)
    draw = ImageDraw.Draw(band)
    y = MARGIN
    for text, face, colour in rows:
        x = MARGIN if align == "left" else max(0, (width - text_width(text, face)) // 2)
        draw.text((x, y), text, font=face, fill=colour)
        y += line_height(face)
    return np.asarray(band)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def _fmt(value: float, step: float | None = None) -> str:
    """A tick label with enough digits to tell ticks ``step`` apart (0.00102, 0.00105...)."""
    if value == 0:
        return "0"
    if step is not None and step > 0 and abs(value) < 1000:
        decimals = max(0, 1 - math.floor(math.log10(step)))
        if decimals <= 6:
            return f"{value:.{decimals}f}"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def colour_bar(
    low: float, high: float, *, width: int, cmap: str = "jet", label: str = "",
    rgb: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """A horizontal colour bar from ``low`` to ``high`` with tick values and a label under it.

    ``cmap`` names a matplotlib map; ``rgb`` (two colours) draws a linear ramp instead (the grey
    ramp of signed RGB attributions).
    """
    inner = max(60, width - 2 * MARGIN - 12)
    ramp = np.linspace(0.0, 1.0, inner, dtype=np.float32)
    if rgb is not None:
        start, end = (np.asarray(c, np.float32) for c in rgb)
        colours = np.rint(start + ramp[:, None] * (end - start)).astype(np.uint8)
    else:
        colours = colorize(ramp, cmap)
    small = font(SMALL_SIZE)
    bar_height = 12
    tick_row = line_height(small)
    label_rows = wrap(label, small, width - 2 * MARGIN) if label else []
    height = 4 + bar_height + 3 + tick_row + len(label_rows) * tick_row + 4
    band = Image.new("RGB", (width, height), BACKGROUND)
    left = (width - inner) // 2
    band.paste(Image.fromarray(np.repeat(colours[None], bar_height, axis=0)), (left, 4))
    draw = ImageDraw.Draw(band)
    draw.rectangle((left - 1, 3, left + inner, 4 + bar_height), outline=MUTED)
    for count in (5, 3, 2):  # fewer ticks when long labels would overlap
        ticks = _ticks(low, high, count)
        step = (ticks[1] - ticks[0]) if len(ticks) > 1 else None
        if sum(text_width(_fmt(v, step), small) + 8 for v in ticks) <= inner:
            break
    for value in ticks:
        fraction = 0.0 if high <= low else (value - low) / (high - low)
        x = left + round(fraction * (inner - 1))
        draw.line((x, 4 + bar_height, x, 4 + bar_height + 3), fill=INK)
        text = _fmt(value, step)
        w = text_width(text, small)
        draw.text((min(max(0, x - w // 2), width - w), 4 + bar_height + 3), text, font=small, fill=INK)
    y = 4 + bar_height + 3 + tick_row
    for row in label_rows:
        draw.text(((width - text_width(row, small)) // 2, y), row, font=small, fill=MUTED)
        y += tick_row
    return np.asarray(band)


def stack(blocks: Sequence[np.ndarray], *, gap: int = 0, align: str = "center") -> np.ndarray:
    """Blocks one under the other on white, ``align`` ``"center"`` or ``"left"``."""
    blocks = [as_rgb(b) for b in blocks if b is not None and b.size]
    width = max(b.shape[1] for b in blocks)
    height = sum(b.shape[0] for b in blocks) + gap * (len(blocks) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for block in blocks:
        x = (width - block.shape[1]) // 2 if align == "center" else 0
        canvas[y : y + block.shape[0], x : x + block.shape[1]] = block
        y += block.shape[0] + gap
    return canvas


def side_by_side(blocks: Sequence[np.ndarray], *, gap: int = 8, margin: int = 0) -> np.ndarray:
    """Blocks in one row, top-aligned on white."""
    blocks = [as_rgb(b) for b in blocks]
    height = max(b.shape[0] for b in blocks) + 2 * margin
    width = sum(b.shape[1] for b in blocks) + gap * (len(blocks) - 1) + 2 * margin
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = margin
    for block in blocks:
        canvas[margin : margin + block.shape[0], x : x + block.shape[1]] = block
        x += block.shape[1] + gap
    return canvas


def pad_to_width(picture: np.ndarray, width: int) -> np.ndarray:
    """Centre ``picture`` on a white canvas at least ``width`` px wide."""
    if picture.shape[1] >= width:
        return picture
    canvas = np.full((picture.shape[0], width, 3), 255, np.uint8)
    x = (width - picture.shape[1]) // 2
    canvas[:, x : x + picture.shape[1]] = as_rgb(picture)
    return canvas


def pad_height(picture: np.ndarray, height: int) -> np.ndarray:
    """``picture`` on a white canvas at least ``height`` px tall (top-aligned)."""
    if picture.shape[0] >= height:
        return picture
    canvas = np.full((height, picture.shape[1], 3), 255, np.uint8)
    canvas[: picture.shape[0]] = as_rgb(picture)
    return canvas


@dataclass(frozen=True)
class Bar:
    """What a figure's colour bar shows: the value range behind the colours."""

    low: float
    high: float
    label: str
    cmap: str = "jet"
    rgb: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None


def figure(
    picture: np.ndarray,
    title: str,
    lines: Sequence[Line] = (),
    bar: Bar | None = None,
    *,
    min_side: int = MIN_SIDE,
    min_width: int = 360,
) -> np.ndarray:
    """Caption on top, the (enlarged) picture, then the colour bar: one ``(H, W, 3)`` uint8."""
    body = enlarge(as_rgb(picture), min_side)
    width = max(body.shape[1] + 2 * MARGIN, min_width)
    blocks = [text_block(title, lines, width), pad_to_width(body, width)]
    if bar is not None:
        blocks.append(colour_bar(bar.low, bar.high, width=min(width, max(body.shape[1], 240)),
                                 cmap=bar.cmap, label=bar.label, rgb=bar.rgb))
    return stack([*blocks, np.full((MARGIN, width, 3), 255, np.uint8)])


def labelled_tile(picture: np.ndarray, label: str, *, size: int = SMALL_SIZE, width: int | None = None) -> np.ndarray:
    """``picture`` with ``label`` centred in a band under it (never over the pixels)."""
    width = width or picture.shape[1]
    face = font(size)
    rows = wrap(label, face, width) if label else []
    band = Image.new("RGB", (width, max(1, len(rows)) * line_height(face)), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for k, row in enumerate(rows):
        draw.text(((width - text_width(row, face)) // 2, k * line_height(face)), row, font=face, fill=INK)
    return stack([pad_to_width(as_rgb(picture), width), np.asarray(band)])


def labelled_grid(
    tiles: Sequence[np.ndarray], labels: Sequence[str], *, columns: int | None = None,
    min_side: int = 48, gap: int = 4,
) -> np.ndarray:
    """Equal-size tiles (each enlarged nearest to the same cell) with labels under them."""
    if not tiles:
        raise ValueError("no tiles to arrange")
    rgb = [as_rgb(t) for t in tiles]
    cell_h = max(t.shape[0] for t in rgb)
    cell_w = max(t.shape[1] for t in rgb)
    factor = max(1, math.ceil(min_side / max(1, min(cell_h, cell_w))))
    cells = []
    for t in rgb:
        # Tiles of unequal size are scaled to the same cell (nearest), never left ragged.
        if t.shape[:2] != (cell_h, cell_w):
            t = np.asarray(Image.fromarray(t).resize((cell_w, cell_h), Image.Resampling.NEAREST))
        cells.append(enlarge(t, 1) if factor == 1 else np.repeat(np.repeat(t, factor, 0), factor, 1))
    side_w = cells[0].shape[1]
    face = font(SMALL_SIZE)
    widest = max((text_width(label, face) for label in labels), default=0)
    cell_width = max(side_w, min(widest + 4, 2 * side_w))
    labelled = [labelled_tile(c, label, width=cell_width) for c, label in zip(cells, labels, strict=False)]
    labelled += [pad_to_width(c, cell_width) for c in cells[len(labelled):]]
    tile_h = max(t.shape[0] for t in labelled)
    cols = columns or math.ceil(math.sqrt(len(labelled)))
    rows = math.ceil(len(labelled) / cols)
    canvas = np.full((rows * (tile_h + gap) + gap, cols * (cell_width + gap) + gap, 3), 255, np.uint8)
    for i, block in enumerate(labelled):
        r, c = divmod(i, cols)
        y, x = gap + r * (tile_h + gap), gap + c * (cell_width + gap)
        canvas[y : y + block.shape[0], x : x + block.shape[1]] = block
    return canvas


def titled(picture: np.ndarray, title: str, lines: Sequence[Line] = (), *, min_width: int = 300) -> np.ndarray:
    """A grid or strip with a caption band on top (no enlargement, no colour bar)."""
    width = max(picture.shape[1], min_width)
    return stack([text_block(title, lines, width), pad_to_width(as_rgb(picture), width),
                  np.full((MARGIN, width, 3), 255, np.uint8)])


def png_bytes(picture: np.ndarray | Image.Image) -> bytes:
    """PNG encoding of a picture (for ``_repr_png_`` and HTTP answers), as every file is written."""
    from convscope.atomic import png_bytes as encode

    return encode(picture if isinstance(picture, Image.Image) else np.ascontiguousarray(as_rgb(picture)))
