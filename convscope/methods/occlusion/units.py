"""The units of the incremental chain: which modules, from the input on, are spatially local.

One clean forward pass is recorded with every module call and the tensors it saw
(``record``, on ``probes.hooks.trace_calls``). ``leading_chain`` then walks the calls in forward
order and keeps the longest run of local modules, each fed by the previous one's output, as
``Unit``\\ s of three kinds (see ``convscope.methods.occlusion.replay`` for how each is replayed):
``window`` (plain convolutions and pools), ``pointwise`` and ``pad``, and ``block`` (any other
local module or container, run whole on a crop). The reach of each unit comes from
``probes.geometry.reach``; a block's is composed from its leaves by following its tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import BadArgument
from convscope.probes.geometry import Reach, is_pointwise, reach, window_of
from convscope.probes.hooks import ModuleCall, reduce_outputs, trace_calls

if TYPE_CHECKING:
    from convscope.probes.layout import Layout


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
class Recording:
    """One forward pass of the clean image: the call tree, logits and conv/linear costs."""

    root: ModuleCall
    logits: torch.Tensor
    calls_per_module: dict[int, int]
    macs: dict[str, int]  # module path -> multiply-adds per image (leaf conv / linear calls)
    outputs: dict[int, ModuleCall]  # id(module) -> its last call
    layer_totals: list[torch.Tensor]  # per call of the watched layer: (1, C) spatial sums, or empty

    def release(self) -> None:
        """Drop the call tree and the activations it holds (``logits`` and costs stay)."""
        self.root = ModuleCall(self.root.module, self.root.path, None, -1, None, None)
        self.outputs = {}


def _leaf_macs(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    per_image = math.prod(output_shape[1:])
    if isinstance(module, nn.Conv2d) and len(output_shape) == 4:
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups * kh * kw)
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


def channel_totals(channel: int | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A ``reduce_outputs`` reduction: the spatial sum of a 4-D output, ``(N,)`` for one
    ``channel`` or ``(N, C)`` for all; an empty tensor for any other output, and for a call
    without that channel (a reused module such as ResNet's block ReLU has several widths in
    one forward). NHWC and token layers reach it as ``(N, C, h, w)`` views (``reduce_outputs``'s
    ``layouts``)."""

    def reduce(name: str, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 4:
            return torch.empty(0)
        if channel is not None:
            if channel >= output.shape[1]:
                return torch.empty(0)
            return output[:, channel].float().sum(dim=(1, 2))
        return output.float().sum(dim=(2, 3))

    return reduce


def describe_output(output: object) -> str:
    """What a model returned, for the one-line refusal of anything but ``(N, classes)`` scores."""
    if isinstance(output, torch.Tensor):
        return f"a {output.dim()}-D tensor of shape {tuple(output.shape)}"
    if isinstance(output, dict):
        keys = ", ".join(map(str, list(output)[:6]))
        return f"a dict with keys {keys}"
    if isinstance(output, (list, tuple)):
        tensors = sum(isinstance(item, torch.Tensor) for item in output)
        kind = type(output).__name__
        what = f"{tensors} tensor{'s' if tensors != 1 else ''}" if tensors == len(output) else f"{len(output)} items"
        return f"a {kind} of {what}"
    return f"a {type(output).__name__}"


def check_scores(output: object, batch: int) -> torch.Tensor:
    """``output`` if it is ``(batch, classes)`` scores, else a one-line ``BadArgument``."""
    if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[0] == batch and output.is_floating_point():
        return output
    raise BadArgument(
        "model", f"returns {describe_output(output)}, not (N, classes) scores: occlusion needs a classifier's scores",
        "pick the scores with load_model(..., output_index=...) or wrap the module so that it returns one tensor",
    )


def record(model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None, layout: Layout | None = None) -> Recording:
    """Run ``model(x)`` (batch of one) recording every module call and the tensors it saw, and
    the per-channel totals of ``layer`` (a module of ``model``, read through its ``layout``)
    when given.

    Raises:
        BadArgument: the model does not return ``(1, classes)`` scores (a tuple, a dict, a map).
    """
    watched: Mapping[str, nn.Module] = {"layer": layer} if layer is not None else {}
    layouts = {"layer": layout} if layer is not None else None
    with trace_calls(model) as traced, reduce_outputs(model, watched, channel_totals(None), layouts) as totals:
        logits = check_scores(model(x), x.shape[0])
    counts: dict[int, int] = {}
    macs: dict[str, int] = {}
    last: dict[int, ModuleCall] = {}
    for call in traced.calls:  # in the order they returned
        counts[id(call.module)] = counts.get(id(call.module), 0) + 1
        if call.output_shape is not None and next(call.module.children(), None) is None:
            macs[call.path] = macs.get(call.path, 0) + _leaf_macs(call.module, call.output_shape)
        last[id(call.module)] = call
    return Recording(traced.roots[0], logits, counts, macs, last, totals.outputs.get("layer", []))


# ---------------------------------------------------------------------------------------------
# Unit discovery


def _plain_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _window_function(module: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], float] | None:
    """For canvas-friendly layers: ``(f(padded crop), pad value)``; f runs the layer unpadded."""
    window = window_of(module)
    if window is None:
        return None
    kernel, stride, _, dilation = window
    if isinstance(module, nn.Conv2d) and _plain_forward(module, nn.Conv2d) and module.padding_mode == "zeros":
        conv = module

        def run_conv(crop: torch.Tensor) -> torch.Tensor:
            return F.conv2d(crop, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)  # type: ignore[arg-type]

        return run_conv, 0.0
    if _plain_forward(module, nn.MaxPool2d) and not module.ceil_mode and not module.return_indices:

        def run_max(crop: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(crop, kernel, stride, 0, dilation)

        return run_max, -math.inf
    if (
        _plain_forward(module, nn.AvgPool2d)
        and not module.ceil_mode
        and module.count_include_pad
        and module.divisor_override is None
    ):

        def run_avg(crop: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(crop, kernel, stride, 0)

        return run_avg, 0.0
    return None


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _leaves(call: ModuleCall) -> Iterator[ModuleCall]:
    if not call.children:
        yield call
    for child in call.children:
        yield from _leaves(child)


def _compose(first: Reach, then: Reach) -> Reach:
    s1, a1, b1 = first
    s2, a2, b2 = then
    return (s1 * s2, a1 + s1 * a2, b1 + s1 * b2)


def _block_reach(call: ModuleCall) -> tuple[Reach, Reach] | None:
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
        leaf_reach = reach(leaf.module)
        if leaf_reach is None or leaf.input_shape is None or len(leaf.input_shape) != 4:
            return None
        entry = known.get(key(leaf.input, leaf.input_version))
        before = entry[1] if entry is not None else union(leaf.input_shape[2:])
        if before is None:
            return None
        after = (_compose(before[0], leaf_reach[0]), _compose(before[1], leaf_reach[1]))
        if not isinstance(leaf.output, torch.Tensor) or leaf.output.dim() != 4:
            return None
        known[key(leaf.output, leaf.output_version)] = (tuple(leaf.output.shape[2:]), after)
    if not isinstance(call.output, torch.Tensor) or call.output.dim() != 4:
        return None
    entry = known.get(key(call.output, call.output_version))
    return entry[1] if entry is not None else union(tuple(call.output.shape[2:]))


def _axes(axes: tuple[Reach, Reach], sizes_in: tuple[int, int], sizes_out: tuple[int, int]) -> tuple[Axis, Axis]:
    rows, cols = (
        Axis(s, low, high, n_in, n_out)
        for (s, low, high), n_in, n_out in zip(axes, sizes_in, sizes_out, strict=True)
    )
    return rows, cols


def _canvas_axes(axes: tuple[Reach, Reach], sizes_in: tuple[int, int], sizes_out: tuple[int, int]) -> tuple[Axis, Axis]:
    """Window units: the canvas (the input padded with the module's padding) starts ``-low``
    cells before the input and ends where the last output's window does."""
    rows, cols = (
        Axis(s, low, high, n_in, n_out, -low, max(0, s * (n_out - 1) + high - (n_in - 1)))
        for (s, low, high), n_in, n_out in zip(axes, sizes_in, sizes_out, strict=True)
    )
    return rows, cols


def _unit_of(call: ModuleCall, recording: Recording) -> Unit | None:
    module = call.module
    if recording.calls_per_module.get(id(module), 0) != 1:
        return None  # reused modules (ResNet's block ReLU) cannot be swapped out
    if call.input_shape is None or len(call.input_shape) != 4:
        return None
    output = call.output
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        return None
    (_, cin, hin, win), (_, cout, hout, wout) = call.input_shape, tuple(output.shape)
    sizes_in, sizes_out = (hin, win), (hout, wout)
    if call.children:
        block_reach = _block_reach(call)
        if block_reach is None:
            return None
        macs = sum(recording.macs.get(leaf.path, 0) for leaf in _leaves(call))
        return Unit(call.path, module, "block", _axes(block_reach, sizes_in, sizes_out), cin, cout,
                    macs // max(1, hout * wout))
    leaf_reach = reach(module)
    if leaf_reach is None:
        return None
    macs = recording.macs.get(call.path, 0) // max(1, hout * wout)
    window = _window_function(module)
    if window is not None:
        function, pad_value = window
        return Unit(call.path, module, "window", _canvas_axes(leaf_reach, sizes_in, sizes_out), cin, cout, macs,
                    pad_value, function)
    if isinstance(module, nn.ZeroPad2d):
        if min(module.padding) < 0:
            return None
        return Unit(call.path, module, "pad", _axes(leaf_reach, sizes_in, sizes_out), cin, cout)
    if is_pointwise(module):
        if sizes_in != sizes_out:
            return None
        return Unit(call.path, module, "pointwise", _axes(leaf_reach, sizes_in, sizes_out), cin, cout)
    # local but not canvas-friendly (a ceil-mode pool, a reflect-padded convolution): a block
    return Unit(call.path, module, "block", _axes(leaf_reach, sizes_in, sizes_out), cin, cout, macs)


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

    def walk(call: ModuleCall) -> bool:
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
