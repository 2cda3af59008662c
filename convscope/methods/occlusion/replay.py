"""Incremental inference for occlusion (Nakandala et al., "Incremental and Approximate
Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019).

An occluding square changes only the cells of an early layer that can see it. Along the
leading chain of spatially local layers (convolutions, pools, padding, pointwise layers and
blocks built from them) we run the clean image once, then for each occluded copy recompute
only that region: the layer runs on a crop of its (clean, with the copy's changed cells
pasted in) input, and keeps the outputs whose whole reach lies in the crop or beyond a real
image edge. Where the changed region would cover most of a map, the copy's patch is pasted
into the clean activation and the rest of the network runs as usual (the model's own
forward, with the chain's modules swapped for a replay of our result, restored in
``finally``).

Geometry, per axis: a unit with stride ``s`` reads input cells ``s*o + low .. s*o + high`` for
output ``o``. Three kinds of units:

* ``window``: plain ``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d``. They run as the functional op
  with no padding on a crop of the input padded once with the module's own padding value
  (zeros, or -inf for max pooling), so no work is wasted at crop edges.
* ``pointwise`` (activations, eval BatchNorm, LRN, dropout) runs on the patch itself; ``pad``
  (``ZeroPad2d``) only shifts coordinates.
* ``block``: any other local module (an ``MBConv`` or residual block, a ceil-mode pool) runs
  as a black box on an aligned crop; its reach is composed from its leaves and checked on the
  clean image before it is trusted.

Everything here is exact: outputs equal a full recomputation up to float summation order.

In this package: ``units`` finds the chain's units and their reach (from
``probes.geometry.reach``), ``plan`` works out each copy's patch and crop per unit, ``chain``
decides how far the chain goes, and this module runs it: the clean pass along the chain, the
crops gathered and patched in channels-last layout, and the swap of the chain's modules for a
replay of the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from convscope.methods.occlusion.plan import AxisPlan
from convscope.methods.occlusion.units import Unit

# A black-box block's crop result must equal the full computation to this relative tolerance.
_CHECK_RTOL = 1e-4


@dataclass
class CleanPass:
    """Clean activations along the chain: each unit's input canvas (window units), input
    (blocks) and output."""

    inputs: list[torch.Tensor]
    canvases: list[torch.Tensor | None]
    outputs: list[torch.Tensor]
    _rows: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def rows_of(self, kind: str, index: int) -> torch.Tensor:
        """``(H * W, C)``: the canvas (``kind="canvas"``), input or output of unit ``index``
        with one contiguous row of channels per cell, made once and kept."""
        key = (kind, index)
        if key not in self._rows:
            tensors: dict[str, Sequence[torch.Tensor | None]] = {
                "canvas": self.canvases, "input": self.inputs, "output": self.outputs
            }
            source = tensors[kind][index]
            assert source is not None
            self._rows[key] = source[0].permute(1, 2, 0).reshape(-1, source.shape[1]).contiguous()
        return self._rows[key]


def run_clean(units: Sequence[Unit], x: torch.Tensor) -> tuple[CleanPass, int]:
    """Run the chain on one clean image with the modules themselves.

    Returns the activations and how many units can be trusted: a window unit whose canvas
    form disagrees with its module, or a block whose crop form disagrees, ends the chain.
    """
    inputs, canvases, outputs = [], [], []
    current = x
    trusted = len(units)
    for index, unit in enumerate(units):
        source = current
        # In-place layers (ReLU(inplace=True), inside blocks too) would overwrite the stored input.
        out = unit.module(source if unit.kind == "window" else source.clone())
        canvas = None
        if unit.kind == "window":
            (top, bottom), (left, right) = ((unit.axes[0].pad_before, unit.axes[0].pad_after),
                                            (unit.axes[1].pad_before, unit.axes[1].pad_after))
            canvas = F.pad(source, (left, right, top, bottom), value=unit.pad_value)
            assert unit.function is not None
            if not close(unit.function(canvas), out):
                trusted = index
        inputs.append(source)
        canvases.append(canvas)
        outputs.append(out)
        if trusted == index:
            break
        current = out
    return CleanPass(inputs, canvases, outputs), trusted


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to summation order: ``_CHECK_RTOL`` of the largest magnitude in float32,
    a few units in the last place for 16-bit floats."""
    if a.shape != b.shape:
        return False
    if not a.numel():
        return True
    rtol = _CHECK_RTOL if torch.finfo(b.dtype).bits > 16 else 3e-2
    scale = float(b.abs().max())
    return bool((a.float() - b.float()).abs().max() <= rtol * scale + 1e-6)


def check_block(unit: Unit, clean: CleanPass, index: int, rows: AxisPlan, cols: AxisPlan) -> bool:
    """Does the block's crop form reproduce the clean output at the first, middle and last
    planned positions?"""
    for i, j in ((0, 0), (len(rows.start) // 2, len(cols.start) // 2), (len(rows.start) - 1, len(cols.start) - 1)):
        r0, c0 = rows.crop[i], cols.crop[j]
        crop = clean.inputs[index][:, :, r0 : r0 + rows.length, c0 : c0 + cols.length]
        out = unit.module(crop.clone())
        kr, kc = rows.keep[i], cols.keep[j]
        got = out[:, :, kr : kr + rows.size, kc : kc + cols.size]
        want = clean.outputs[index][
            :, :, rows.start[i] : rows.start[i] + rows.size, cols.start[j] : cols.start[j] + cols.size
        ]
        if not close(got, want):
            return False
    return True


def _as_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64, device=device)


def _gather(
    rows_of_source: torch.Tensor, width: int, rows: torch.Tensor, cols: torch.Tensor, height: int, length: int
) -> torch.Tensor:
    """Crops ``(B, height, length, C)`` (contiguous) at ``(rows[b], cols[b])`` of a map given
    as ``(H * W, C)`` rows of ``width`` cells: one gather of whole channel rows (``embedding``
    is a row lookup, several times faster on CPU than ``index_select`` for these shapes)."""
    device = rows_of_source.device
    r = rows[:, None] + torch.arange(height, device=device)
    c = cols[:, None] + torch.arange(length, device=device)
    flat = (r[:, :, None] * width + c[:, None, :]).reshape(-1)
    return F.embedding(flat, rows_of_source).view(rows.numel(), height, length, -1)


def _paste(crops: torch.Tensor, patch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Copy each ``patch[b]`` (``(B, C, h, w)``) into ``crops[b]`` (``(B, H, W, C)``,
    contiguous) with its corner at ``(rows[b], cols[b])`` of the crop, clipped to the crop:
    one ``index_copy_`` of channel rows."""
    count, height, width, channels = crops.shape
    ph, pw = patch.shape[-2:]
    device = crops.device
    r = rows[:, None] + torch.arange(ph, device=device)  # (B, ph)
    c = cols[:, None] + torch.arange(pw, device=device)  # (B, pw)
    base = torch.arange(count, device=device)[:, None, None] * (height * width)
    dest = (base + r[:, :, None] * width + c[:, None, :]).reshape(-1)
    source = patch.permute(0, 2, 3, 1).reshape(-1, channels)
    inside = bool(r.min() >= 0 and r.max() < height and c.min() >= 0 and c.max() < width) if count else True
    if not inside:
        keep = ((r >= 0) & (r < height))[:, :, None] & ((c >= 0) & (c < width))[:, None, :]
        keep = keep.reshape(-1)
        dest, source = dest[keep], source[keep]
    crops.view(-1, channels).index_copy_(0, dest, source)


def _nchw(crops: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` contiguous -> ``(B, C, H, W)`` channels-last view (no copy)."""
    return crops.permute(0, 3, 1, 2)


def propagate(
    units: Sequence[Unit],
    clean: CleanPass,
    rows: Sequence[AxisPlan],
    cols: Sequence[AxisPlan],
    patch: torch.Tensor,
    row_index: Sequence[int],
    col_index: Sequence[int],
    input_rows: Sequence[int],
    input_cols: Sequence[int],
    watch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Carry a batch of input patches (copy ``b`` at grid position ``(row_index[b],
    col_index[b])``, placed at ``(input_rows[b], input_cols[b])``) through the chain.

    Crops are gathered and patched in channels-last layout (one row gather and one
    ``index_copy_`` per unit and chunk) and convolved as channels-last views.

    Returns:
        the last unit's output patches ``(B, C, h, w)`` and, when ``watch`` is a unit index,
        that unit's output patches (cloned before later in-place layers touch them).
    """
    device = patch.device
    ri, ci = _as_tensor(row_index, device), _as_tensor(col_index, device)
    prev_rows, prev_cols = _as_tensor(input_rows, device), _as_tensor(input_cols, device)
    watched = None
    for index, unit in enumerate(units):
        rp, cp = rows[index], cols[index]
        if unit.kind == "pointwise":
            patch = unit.module(patch)
        elif unit.kind == "pad":
            pass
        else:
            crop_rows = _as_tensor(rp.crop, device)[ri]
            crop_cols = _as_tensor(cp.crop, device)[ci]
            if unit.kind == "window":
                offset_r, offset_c = unit.axes[0].pad_before, unit.axes[1].pad_before
                source, width = clean.rows_of("canvas", index), clean.canvases[index].shape[-1]  # type: ignore[union-attr]
            else:
                offset_r = offset_c = 0
                source, width = clean.rows_of("input", index), clean.inputs[index].shape[-1]
            crops = _gather(source, width, crop_rows, crop_cols, rp.length, cp.length)
            _paste(crops, patch, prev_rows + offset_r - crop_rows, prev_cols + offset_c - crop_cols)
            if unit.kind == "window":
                assert unit.function is not None
                patch = unit.function(_nchw(crops))
            else:
                out = unit.module(_nchw(crops))
                keeps = {(rp.keep[i], cp.keep[j]) for i, j in zip(row_index, col_index, strict=True)}
                if len(keeps) == 1:
                    kr, kc = keeps.pop()
                    patch = out[:, :, kr : kr + rp.size, kc : kc + cp.size]
                else:
                    patch = torch.stack([
                        out[b, :, rp.keep[i] : rp.keep[i] + rp.size, cp.keep[j] : cp.keep[j] + cp.size]
                        for b, (i, j) in enumerate(zip(row_index, col_index, strict=True))
                    ])
        prev_rows = _as_tensor(rp.start, device)[ri]
        prev_cols = _as_tensor(cp.start, device)[ci]
        if index == watch:
            watched = patch.clone()
    return patch, watched


def materialize(
    clean: CleanPass, patch: torch.Tensor, rows: Sequence[int], cols: Sequence[int]
) -> torch.Tensor:
    """Paste each copy's patch into its own copy of the chain's clean output: ``(B, C, H, W)``
    in channels-last layout."""
    last = clean.outputs[-1]
    _, channels, height, width = last.shape
    count = patch.shape[0]
    full = clean.rows_of("output", len(clean.outputs) - 1).view(1, height, width, channels)
    full = full.expand(count, -1, -1, -1).contiguous()
    device = patch.device
    _paste(full, patch, _as_tensor(rows, device), _as_tensor(cols, device))
    return _nchw(full)


class _Replay(nn.Module):
    """Stands in for the first unit of the chain: returns the prepared batch, ignoring its input."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        assert self.value is not None
        return self.value


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


@contextmanager
def replayed(model: nn.Module, units: Sequence[Unit]) -> Iterator[_Replay]:
    """Swap the chain's modules for a replay of its last output (first unit) and identities
    (the rest); the original modules are put back in ``finally``."""
    replay = _Replay()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for index, unit in enumerate(units):
            parent, name = _parent(model, unit.path)
            original = parent._modules[name]
            assert original is unit.module
            swapped.append((parent, name, original))
            parent._modules[name] = replay if index == 0 else nn.Identity()
        yield replay
    finally:
        for parent, name, original in reversed(swapped):
            parent._modules[name] = original
