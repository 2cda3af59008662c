"""Dataset patches as pictures: per channel, the top crops beside their deconvnet projections
(Zeiler & Fergus 2014, Fig. 2), and an offline HTML gallery of all channels. Pure: no model runs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from convscope.render.colormaps import as_array, to_rgb_uint8
from convscope.render.grids import tile
from convscope.render.pictures import relevance_picture, signed_picture

GREY = 128


def _pad_to(tile_pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre an ``(h, w, 3)`` tile on a grey ``(height, width, 3)`` canvas (clipped boxes at the
    image border are smaller than the receptive field; padding keeps every tile at one scale)."""
    canvas = np.full((height, width, 3), GREY, np.uint8)
    h, w = tile_pixels.shape[:2]
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top : top + h, left : left + w] = tile_pixels
    return canvas


def _grid(pictures: list[np.ndarray], labels: list[str], columns: int, min_side: int) -> np.ndarray:
    height = max(p.shape[0] for p in pictures)
    width = max(p.shape[1] for p in pictures)
    padded = [_pad_to(p, height, width) for p in pictures]
    return tile(padded, labels=labels, columns=columns, min_side=min_side)


def channel_figure(
    crops: Sequence[Any],
    projections: Sequence[Any] | None,
    values: Sequence[float],
    *,
    min_side: int = 64,
    relevance: bool = False,
) -> np.ndarray:
    """One channel's figure: a grid of the crops, and beside it the grid of their projections.

    Args:
        crops: per entry, ``(C, h, w)`` float in ``[0, 1]`` (C = 1 or 3).
        projections: per entry, ``(C, h, w)`` signed projections (zero shown mid-grey), or ``None``.
        values: per entry, the activation (or relevance), written on both of its tiles.
        relevance: the projections are conditional relevance maps (``--rank relevance``): drawn
            summed over colours in blue-white-red (red: evidence for the class), as LRP is.
        min_side: tiles are enlarged (nearest neighbour) to at least this many pixels.

    Returns:
        ``(H, W, 3)`` uint8; a 3x3 + 3x3 layout for nine entries (``ceil(sqrt(n))`` columns).
    """
    if not crops:
        raise ValueError("a channel figure needs at least one patch")
    columns = math.ceil(math.sqrt(len(crops)))
    labels = [f"{v:.3g}" for v in values]
    left = _grid([to_rgb_uint8(c) for c in crops], labels, columns, min_side)
    if projections is None:
        return left
    draw = (lambda p: relevance_picture(as_array(p).sum(axis=0))) if relevance else signed_picture
    right = _grid([draw(p) for p in projections], labels, columns, min_side)
    gap = np.full((max(left.shape[0], right.shape[0]), 8, 3), 255, np.uint8)
    height = gap.shape[0]
    parts = [np.pad(part, ((0, height - part.shape[0]), (0, 0), (0, 0)), constant_values=255) for part in (left, right)]
    return np.concatenate([parts[0], gap, parts[1]], axis=1)


def enlarge(picture: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor until the shorter side reaches ``min_side``
    (a 7x7 patch of a 28x28 image stays legible, and its pixels stay square)."""
    side = min(picture.shape[:2])
    factor = max(1, math.ceil(min_side / max(side, 1)))
    return picture if factor == 1 else np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def patch_pictures(
    crop: Any, projection: Any | None, *, relevance: bool = False, min_side: int = 64,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One patch's two pictures, as ``channel_figure`` draws its tiles: the crop, and its deconvnet
    projection (signed, zero mid-grey) or conditional relevance map (blue-white-red), each
    enlarged to at least ``min_side``."""
    left = enlarge(to_rgb_uint8(crop), min_side)
    if projection is None:
        return left, None
    right = relevance_picture(as_array(projection).sum(axis=0)) if relevance else signed_picture(projection)
    return left, enlarge(right, min_side)


def gallery_html(
    title: str,
    layers: dict[str, list[dict[str, Any]]],
    *,
    notes: Sequence[str] = (),
) -> str:
    """A self-contained page listing every channel picture, linked by relative paths.

    Args:
        title: page heading.
        layers: layer -> one dict per channel with ``channel``, ``picture`` (the relative path
            the file was written to, or ``None`` when there is none: no link is made), ``best``
            (top value or ``None``) and ``count`` (entries).
        notes: lines shown under the heading (data, skipped files...).

    Returns:
        HTML text; it loads nothing from the network, so it reads offline.
    """
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>",
        "body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}",
        "nav a{margin-right:1em} h2{margin-top:2em;border-bottom:1px solid #ccc}",
        ".grid{display:flex;flex-wrap:wrap;gap:14px}",
        "figure{margin:0;background:#fff;padding:6px;border:1px solid #ddd}",
        "figure img{display:block;max-width:460px;image-rendering:pixelated}",
        "figcaption{font-size:0.85em;margin-top:4px}",
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f"<p>{esc(line)}</p>" for line in notes]
    parts.append("<nav>" + "".join(f'<a href="#{esc(_anchor(n))}">{esc(n)}</a>' for n in layers) + "</nav>")
    for name, channels in layers.items():
        parts.append(f'<h2 id="{esc(_anchor(name))}">{esc(name)}</h2><div class="grid">')
        for item in channels:
            best = item.get("best")
            caption = f"channel {item['channel']}" + (f" &middot; top {best:.3g}" if best is not None else " &middot; no patches")
            if item.get("picture") is None:
                parts.append(f"<figure><figcaption>{caption}</figcaption></figure>")
                continue
            src = esc(str(item["picture"]), quote=True)
            parts.append(
                f'<figure><a href="{src}"><img loading="lazy" src="{src}" alt="{esc(name)} channel '
                f'{item["channel"]}"></a><figcaption>{caption}</figcaption></figure>'
            )
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _anchor(name: str) -> str:
    return "layer-" + "".join(ch if ch.isalnum() else "-" for ch in name)
