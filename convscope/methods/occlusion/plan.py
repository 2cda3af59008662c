"""Planning: where each occluded copy's changed patch lies in each unit's output.

Along one axis, an input patch ``[start, start + size)`` changes the output cells of a unit
with reach ``(stride, low, high)`` from ``ceil((start - high) / stride)`` to
``(start + size - 1 - low) // stride``, clipped to the map; pointwise units keep the patch and
padding shifts it. ``true_extents`` follows each grid position alone (near the borders the
changed regions are much smaller than inside); ``plan_chunk`` gives a chunk of positions one
common patch size per unit, and the crops that compute them; ``bands`` groups positions whose
changed regions are alike, so that a chunk pays for little more than its members need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from convscope.methods.occlusion.units import Unit


@dataclass(frozen=True)
class AxisPlan:
    """Per grid index along one axis: the patch of a unit's output that may differ from clean."""

    start: tuple[int, ...]  # patch start in the unit's output
    size: int
    crop: tuple[int, ...] = ()  # crop start (canvas coordinates for window units)
    length: int = 0  # crop length
    keep: tuple[int, ...] = ()  # block units: first kept output of the crop's result


@dataclass(frozen=True)
class Extents:
    """Per grid index along one axis: the exact output cells of a unit that an occluder there
    can change (first cell, count). Near the borders they are much smaller than inside."""

    first: tuple[int, ...]
    size: tuple[int, ...]


def true_extents(units: Sequence[Unit], axis: int, starts: Sequence[int], size: int) -> list[Extents]:
    """Propagate each input patch ``[start, start + size)`` alone through ``units``."""
    per_index = [plan_chunk(units, axis, None, [start], size) for start in starts]
    return [
        Extents(tuple(p[u].start[0] for p in per_index), tuple(p[u].size for p in per_index))
        for u in range(len(units))
    ]


def plan_chunk(
    units: Sequence[Unit],
    axis: int,
    extents: Sequence[Extents] | None,
    starts: Sequence[int],
    size: int,
    members: Sequence[int] | None = None,
) -> list[AxisPlan]:
    """One patch size per unit for the grid indices ``members`` (default: all), each patch
    covering its index's changed cells, plus the crops that compute them.

    Args:
        extents: from ``true_extents``; ``None`` propagates the patches themselves (how the
            extents are found).
        starts: input patch start per grid index; ``size`` their common size.
    """
    plans = []
    current = tuple(starts)
    chosen = range(len(current)) if members is None else members
    for index, unit in enumerate(units):
        geo = unit.axes[axis]
        if unit.kind == "pointwise":
            plans.append(AxisPlan(current, size))
            continue
        if unit.kind == "pad":
            current = tuple(r - geo.low for r in current)
            plans.append(AxisPlan(current, size))
            continue
        s, low, high = geo.stride, geo.low, geo.high
        if extents is None:
            first = [max(0, -((high - r) // s)) for r in current]  # ceil((r - high) / s)
            last = [min(geo.size_out - 1, (r + size - 1 - low) // s) for r in current]
            new_size = max(1, max(b - a + 1 for a, b in zip(first, last, strict=True)))
        else:
            first = list(extents[index].first)
            new_size = max(extents[index].size[i] for i in chosen)
        new_size = min(new_size, geo.size_out)
        new_start = tuple(min(max(a, 0), geo.size_out - new_size) for a in first)
        if unit.kind == "window":
            length = s * (new_size - 1) + (high - low + 1)
            plans.append(AxisPlan(new_start, new_size, tuple(s * o for o in new_start), length))
        else:  # block: an aligned crop of the unpadded input
            length = s * (new_size - 1) + (high - low + 1) + (s - 1)
            while (geo.size_in - length) % s:
                length += 1
            if length >= geo.size_in:
                crops = tuple(0 for _ in new_start)
                length = geo.size_in
            else:
                crops = tuple(
                    min(max(((s * o + low) // s) * s, 0), geo.size_in - length) for o in new_start
                )
            keep = tuple(o - c // s for o, c in zip(new_start, crops, strict=True))
            plans.append(AxisPlan(new_start, new_size, crops, length, keep))
        current = new_start
        size = new_size
    return plans


def bands(
    extents: Sequence[Extents], weights: Sequence[float], count: int, band: int, overhead: float = 4.0
) -> list[list[int]]:
    """Group the grid indices of one axis into bands of at most ``band``.

    A chunk (one row band x one column band) pays, at every unit, for patches as large as
    its largest member's. Indices are ordered by cost (``weights``: multiply-adds per output
    cell of each unit, times the mean extent along the other axis) and cut into contiguous
    bands by dynamic programming, minimising the work paid plus ``overhead`` times a mean
    index's cost per band (small bands make small, less efficient batches).
    """
    if not extents:
        return [list(range(k, min(count, k + band))) for k in range(0, count, band)]

    def cost(members: Sequence[int]) -> float:
        return sum(w * max(e.size[i] for i in members) for w, e in zip(weights, extents, strict=True))

    order = sorted(range(count), key=lambda i: (-cost([i]), tuple(-e.size[i] for e in reversed(extents))))
    penalty = overhead * sum(cost([i]) for i in range(count)) / max(1, count)
    best = [0.0] + [math.inf] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        for size in range(1, min(band, end) + 1):
            total = best[end - size] + size * cost(order[end - size : end]) + penalty
            if total < best[end]:
                best[end], cut[end] = total, end - size
    groups = []
    end = count
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]
