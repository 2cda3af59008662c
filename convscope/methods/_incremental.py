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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Spatially pointwise in eval mode (BatchNorm only with running statistics; GroupNorm and
# InstanceNorm normalise over space, so they are not here).
_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.LocalResponseNorm, nn.BatchNorm2d,
)

# Above this fraction of a map, pasting patches costs about what recomputing does: the chain
# stops there and the rest of the network runs in full (Krypton's switch-over).
FULL_RECOMPUTE_FRACTION = 0.6

# A black-box block's crop result must equal the full computation to this relative tolerance.
_CHECK_RTOL = 1e-4


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a unit: output ``o`` reads inputs ``stride*o + low .. stride*o + high``."""

    stride: int
    low: int
    high: int
    size_in: int
    size_out: int
    pad_before: int = 0  # canvas padding (window units)
    pad_after: int = 0


@dataclass
class Unit:
    """One module of the leading chain."""

    path: str
    module: nn.Module
    kind: str  # "window" | "pointwise" | "pad" | "block"
    axes: tuple[Axis, Axis]
    in_channels: int
    out_channels: int
    macs_per_cell: int = 0  # multiply-adds per output cell (convolutions in it)
    pad_value: float = 0.0
    function: Callable[[torch.Tensor], torch.Tensor] | None = None
    output_key: tuple[int, int] = (0, -1)  # (id, version) of its output in the recording


@dataclass
class _Call:
    module: nn.Module
    path: str
    input: object
    input_version: int
    input_shape: tuple[int, ...] | None
    parent: _Call | None
    output: object = None
    output_version: int = -1
    children: list[_Call] = field(default_factory=list)


@dataclass
class Recording:
    """One forward pass of the clean image: the call tree, logits and conv/linear costs."""

    root: _Call
    logits: torch.Tensor
    calls_per_module: dict[int, int]
    macs: dict[str, int]  # module path -> multiply-adds per image (leaf conv / linear calls)
    outputs: dict[int, _Call]  # id(module) -> its last call

    def release(self) -> None:
        """Drop the call tree and the activations it holds (``logits`` and costs stay)."""
        self.root = _Call(self.root.module, self.root.path, None, -1, None, None)
        self.outputs = {}


def _first_tensor(inputs: tuple[object, ...]) -> torch.Tensor | None:
    return inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None


def _leaf_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d) and output.dim() == 4:
        kh, kw = module.kernel_size
        per_cell = module.in_channels // module.groups * kh * kw
        return output[0].numel() * per_cell
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def record(model: nn.Module, x: torch.Tensor, extra_hooks: Sequence[tuple[nn.Module, Callable]] = ()) -> Recording:
    """Run ``model(x)`` (batch of one) recording every module call and the tensors it saw."""
    paths = {module: path for path, module in model.named_modules()}
    stack: list[_Call] = []
    roots: list[_Call] = []
    counts: dict[int, int] = {}
    macs: dict[str, int] = {}
    last: dict[int, _Call] = {}
    handles = []

    def pre_hook(module: nn.Module, inputs: tuple[object, ...]) -> None:
        first = _first_tensor(inputs)
        call = _Call(
            module, paths.get(module, "?"), first, first._version if first is not None else -1,
            tuple(first.shape) if first is not None else None, stack[-1] if stack else None,
        )
        (stack[-1].children if stack else roots).append(call)
        stack.append(call)
        counts[id(module)] = counts.get(id(module), 0) + 1

    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        call = stack.pop()
        call.output = output
        if isinstance(output, torch.Tensor):
            call.output_version = output._version
            if next(module.children(), None) is None:
                macs[call.path] = macs.get(call.path, 0) + _leaf_macs(module, output)
        last[id(module)] = call

    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        for module, extra in extra_hooks:
            handles.append(module.register_forward_hook(extra))
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return Recording(roots[0], logits, counts, macs, last)


# ---------------------------------------------------------------------------------------------
# Unit discovery


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)  # type: ignore[attr-defined]
    return (values[0], values[-1])


def _conv_padding(module: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))``; PyTorch puts the odd cell of "same" at the end."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0), (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]
    ph, pw = _pair(module.padding)
    return (ph, ph), (pw, pw)


def _plain_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _window_function(module: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], float, tuple] | None:
    """For canvas-friendly layers: ``(f(padded_crop), pad value, ((kh, kw), (sh, sw), (dh, dw), pads))``."""
    if isinstance(module, nn.Conv2d) and _plain_forward(module, nn.Conv2d) and module.padding_mode == "zeros":
        conv = module

        def run_conv(crop: torch.Tensor) -> torch.Tensor:
            return F.conv2d(crop, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)  # type: ignore[arg-type]

        return run_conv, 0.0, (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), _conv_padding(conv))
    if _plain_forward(module, nn.MaxPool2d) and not module.ceil_mode and not module.return_indices:
        pool = module
        kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        dilation, (ph, pw) = _pair(pool.dilation), _pair(pool.padding)

        def run_max(crop: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(crop, kernel, stride, 0, dilation)

        return run_max, -math.inf, (kernel, stride, dilation, ((ph, ph), (pw, pw)))
    if (
        _plain_forward(module, nn.AvgPool2d)
        and not module.ceil_mode
        and module.count_include_pad
        and module.divisor_override is None
    ):
        pool = module
        kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        ph, pw = _pair(pool.padding)

        def run_avg(crop: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(crop, kernel, stride, 0)

        return run_avg, 0.0, (kernel, stride, (1, 1), ((ph, ph), (pw, pw)))
    return None


def _leaf_reach(module: nn.Module) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Per axis ``(stride, low, high)`` of a local leaf module, else None."""
    if isinstance(module, nn.Conv2d):
        (pt, _), (pl, _) = _conv_padding(module)
        pads = (pt, pl)
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kernel = _pair(module.kernel_size)
        stride = _pair(module.stride or module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        pads = _pair(module.padding)
    elif isinstance(module, nn.ZeroPad2d):
        left, _, top, _ = module.padding
        return (1, -top, -top), (1, -left, -left)
    elif _is_pointwise(module):
        return (1, 0, 0), (1, 0, 0)
    else:
        return None
    axes = []
    for k, s, d, p in zip(kernel, stride, dilation, pads, strict=True):
        axes.append((int(s), -int(p), -int(p) + int(d) * (int(k) - 1)))
    return axes[0], axes[1]


def _is_pointwise(module: nn.Module) -> bool:
    if not isinstance(module, _POINTWISE):
        return False
    if isinstance(module, nn.BatchNorm2d):
        # Without running statistics BatchNorm uses the batch's, even in eval mode.
        return module.track_running_stats and module.running_mean is not None and not module.training
    return not module.training


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _leaves(call: _Call) -> Iterator[_Call]:
    if not call.children:
        yield call
    for child in call.children:
        yield from _leaves(child)


Reach = tuple[int, int, int]


def _compose(first: Reach, then: Reach) -> Reach:
    s1, a1, b1 = first
    s2, a2, b2 = then
    return (s1 * s2, a1 + s1 * a2, b1 + s1 * b2)


def _block_reach(call: _Call) -> tuple[Reach, Reach] | None:
    """Reach of a container made of local leaves, by following its tensors; None if unknown.

    Tensors produced by functional code between leaves (a residual sum) are taken as the union
    of everything recorded at their spatial size; the clean-image check confirms the result.
    """
    known: dict[tuple[int, int], tuple[tuple[int, ...], tuple[Reach, Reach]]] = {}

    def key(tensor: object, version: int) -> tuple[int, int]:
        return (id(tensor), version)

    if call.input_shape is None or len(call.input_shape) != 4:
        return None
    known[key(call.input, call.input_version)] = (call.input_shape[2:], ((1, 0, 0), (1, 0, 0)))

    def union(shape: tuple[int, ...]) -> tuple[Reach, Reach] | None:
        matches = [reach for s, reach in known.values() if s == shape]
        if not matches:
            return None
        result = []
        for axis in range(2):
            strides = {m[axis][0] for m in matches}
            if len(strides) != 1:
                return None
            result.append((strides.pop(), min(m[axis][1] for m in matches), max(m[axis][2] for m in matches)))
        return result[0], result[1]

    for leaf in _leaves(call):
        reach = _leaf_reach(leaf.module)
        if reach is None or leaf.input_shape is None or len(leaf.input_shape) != 4:
            return None
        entry = known.get(key(leaf.input, leaf.input_version))
        before = entry[1] if entry is not None else union(leaf.input_shape[2:])
        if before is None:
            return None
        after = (_compose(before[0], reach[0]), _compose(before[1], reach[1]))
        if not isinstance(leaf.output, torch.Tensor) or leaf.output.dim() != 4:
            return None
        known[key(leaf.output, leaf.output_version)] = (tuple(leaf.output.shape[2:]), after)
    if not isinstance(call.output, torch.Tensor) or call.output.dim() != 4:
        return None
    entry = known.get(key(call.output, call.output_version))
    return entry[1] if entry is not None else union(tuple(call.output.shape[2:]))


def _unit_of(call: _Call, recording: Recording) -> Unit | None:
    module = call.module
    if recording.calls_per_module.get(id(module), 0) != 1:
        return None  # reused modules (ResNet's block ReLU) cannot be swapped out
    if call.input_shape is None or len(call.input_shape) != 4:
        return None
    output = call.output
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        return None
    (_, cin, hin, win), (_, cout, hout, wout) = call.input_shape, tuple(output.shape)
    if call.children:
        reach = _block_reach(call)
        if reach is None:
            return None
        macs = sum(recording.macs.get(leaf.path, 0) for leaf in _leaves(call))
        axes = tuple(Axis(r[0], r[1], r[2], n_in, n_out) for r, n_in, n_out in zip(reach, (hin, win), (hout, wout), strict=True))
        return Unit(call.path, module, "block", axes, cin, cout, macs // max(1, hout * wout))  # type: ignore[arg-type]
    window = _window_function(module)
    if window is not None:
        function, pad_value, (kernel, stride, dilation, pads) = window
        spans = []
        for k, s, d, (before, after), n_in, n_out in zip(kernel, stride, dilation, pads, (hin, win), (hout, wout), strict=True):
            spans.append(Axis(int(s), -before, -before + d * (k - 1), n_in, n_out, before, after))
        macs = recording.macs.get(call.path, 0) // max(1, hout * wout)
        return Unit(call.path, module, "window", (spans[0], spans[1]), cin, cout, macs, pad_value, function)
    if isinstance(module, nn.ZeroPad2d):
        left, right, top, bottom = module.padding
        if min(left, right, top, bottom) < 0:
            return None
        axes = (Axis(1, -top, -top, hin, hout), Axis(1, -left, -left, win, wout))
        return Unit(call.path, module, "pad", axes, cin, cout)
    if _is_pointwise(module):
        if (hin, win) != (hout, wout):
            return None
        axes = (Axis(1, 0, 0, hin, hout), Axis(1, 0, 0, win, wout))
        return Unit(call.path, module, "pointwise", axes, cin, cout)
    if _leaf_reach(module) is not None:  # local but not canvas-friendly: ceil-mode pools...
        reach = _leaf_reach(module)
        assert reach is not None
        axes = tuple(Axis(r[0], r[1], r[2], n_in, n_out) for r, n_in, n_out in zip(reach, (hin, win), (hout, wout), strict=True))
        macs = recording.macs.get(call.path, 0) // max(1, hout * wout)
        return Unit(call.path, module, "block", axes, cin, cout, macs)  # type: ignore[arg-type]
    return None


def leading_chain(recording: Recording, x: torch.Tensor) -> list[Unit]:
    """The longest run of local units from the model input, each fed by the previous one.

    Calls are walked in forward order. Plain ``nn.Sequential`` containers (whose forward is
    exactly the chain of their children) are opened; another container is one unit when it
    is local (a block), else it is opened too: its children continue the chain only while
    each one takes the previous one's output, and ``replayed`` is checked on the clean image
    before anything is trusted (that catches a chain tensor also read elsewhere).
    """
    units: list[Unit] = []
    expected: list[tuple[object, int]] = [(x, x._version)]

    def walk(call: _Call) -> bool:
        if call.children and _is_sequential(call.module):
            return all(walk(child) for child in call.children)
        if call.input is not expected[0][0] or call.input_version != expected[0][1]:
            return False
        unit = _unit_of(call, recording)
        if unit is None:
            if not call.children or recording.calls_per_module.get(id(call.module), 0) != 1:
                return False
            return all(walk(child) for child in call.children) and (
                call.output is expected[0][0] and call.output_version == expected[0][1]
            )
        unit.output_key = (id(call.output), call.output_version)
        units.append(unit)
        expected[0] = (call.output, call.output_version)
        return True

    for child in recording.root.children:
        if not walk(child):
            break
    return units


# ---------------------------------------------------------------------------------------------
# Planning: where each copy's changed patch lies in each unit's output


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


# ---------------------------------------------------------------------------------------------
# Execution


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
