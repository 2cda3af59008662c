"""Spatial arithmetic: output sizes, receptive fields, and cell -> input-box mapping.

One place answers "which input cells can an output cell of this module read?": ``reach(module)``
gives, per axis, the window ``stride * o + low .. stride * o + high`` of input cells that output
``o`` reads, for windows (convolutions, pools), padding and pointwise layers, and ``None`` for
anything else. The receptive fields here and the incremental occlusion engine
(``convscope.methods.occlusion.units``) both build on it, and on the one table of pointwise
layers below.

Receptive fields follow the usual recurrence (per layer with kernel k, stride s, padding p,
dilation d and effective kernel k' = d(k-1)+1, i.e. ``low = -p``, ``high = -p + k' - 1``)::

    size_out  = size_in + (k' - 1) * jump_in
    jump_out  = jump_in * s
    start_out = start_in + ((k' - 1) / 2 - p) * jump_in

with pixel centres at 0.5, 1.5, ... in the input (``start = 0.5``, ``jump = 1``, ``size = 1``).
The values are exact along a plain chain of modules. Where the forward pass leaves the chain
(residual additions, concatenations, functional ops between modules) or a layer's reach is not
a fixed window (adaptive pooling, fully connected layers), the layer is marked inexact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from convscope.probes.hooks import ModuleCall, eval_mode, trace_calls


@dataclass(frozen=True)
class Geometry:
    """Receptive field of one layer's output cells (along the height axis; square kernels)."""

    size: float
    jump: float
    start: float
    exact: bool = True
    is_global: bool = False


INPUT_GEOMETRY = Geometry(size=1.0, jump=1.0, start=0.5)

# Each output cell is a function of the same cell of the input alone (in eval mode: dropout is
# the identity there). BatchNorm2d belongs here only while it uses running statistics; see
# ``is_pointwise``.
POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.LocalResponseNorm, nn.BatchNorm2d,
)

# Normalisations whose statistics are taken over the whole map (and BatchNorm2d computing batch
# statistics: in training, or without running statistics). The decision, made here once:
# an output cell reads its own input cell through the normalised value and every cell of the map
# through the mean and variance. The receptive field describes the first, local path: the
# statistics move every cell of a channel alike, so the input box a cell responds to is still its
# window, and ``propagate`` keeps the field (and its exactness) through these layers. ``reach`` says ``None`` for them: a change anywhere changes every output cell, so the
# incremental occlusion engine, which recomputes only what a patch can reach, stops its chain
# before them. (InstanceNorm2d with running statistics in eval mode is pointwise in fact; it is
# kept here whole, which only costs the engine speed.)
GLOBAL_STATISTICS = (nn.GroupNorm, nn.InstanceNorm2d)

# Per axis ``(stride, low, high)``: output ``o`` reads input cells ``stride * o + low`` to
# ``stride * o + high``.
Reach = tuple[int, int, int]


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)  # type: ignore[attr-defined]
    return (values[0], values[-1])


def window_of(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """``(kernel, stride, padding, dilation)`` as (h, w) pairs for sliding-window layers, else None.

    ``padding`` is what is added before the first cell; a "same" convolution with an even
    reach adds the odd cell after the last (as PyTorch does)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        kernel = _pair(module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))  # AvgPool2d has none
        padding = module.padding
        if isinstance(padding, str):  # "same"/"valid" convolutions
            padding = (0, 0) if padding == "valid" else tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation))
        # Pools default their stride to the kernel (None, or an empty list).
        stride = module.stride or module.kernel_size
        return kernel, _pair(stride), _pair(padding), dilation
    return None


def is_pointwise(module: nn.Module) -> bool:
    """Is each output cell a function of the same input cell alone (``POINTWISE``)?"""
    if isinstance(module, nn.BatchNorm2d):
        # Without running statistics BatchNorm uses the batch's, even in eval mode.
        return module.track_running_stats and module.running_mean is not None and not module.training
    return isinstance(module, POINTWISE)


def has_global_statistics(module: nn.Module) -> bool:
    """Does the module normalise with statistics of the whole map (``GLOBAL_STATISTICS``)?"""
    return isinstance(module, GLOBAL_STATISTICS) or (isinstance(module, nn.BatchNorm2d) and not is_pointwise(module))


def reach(module: nn.Module) -> tuple[Reach, Reach] | None:
    """Per axis (height, width) ``(stride, low, high)`` of a spatially local leaf module, else None.

    Windows (``Conv2d``, ``MaxPool2d``, ``AvgPool2d``, any padding mode or ceil mode), ``ZeroPad2d``
    (a shift, negative when it crops) and pointwise layers; None for everything else, including
    the normalisations of ``GLOBAL_STATISTICS``."""
    window = window_of(module)
    if window is not None:
        kernel, stride, padding, dilation = window
        rows, cols = (
            (s, -p, -p + d * (k - 1)) for k, s, p, d in zip(kernel, stride, padding, dilation, strict=True)
        )
        return rows, cols
    if isinstance(module, nn.ZeroPad2d):
        left, _, top, _ = module.padding
        return (1, -top, -top), (1, -left, -left)
    if is_pointwise(module):
        return (1, 0, 0), (1, 0, 0)
    return None


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """N = floor((W - F_eff + 2P) / S) + 1, with F_eff = D(F-1)+1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def propagate(geo: Geometry, module: nn.Module) -> Geometry:
    """Receptive field after ``module`` given the one before it."""
    axes = reach(module)
    if axes is not None:
        stride, low, high = axes[0]
        # The field follows the height; a window reading the width differently makes it
        # inexact. Padding shifts each axis by whole cells, exactly, whatever its sides.
        alike = axes[0] == axes[1] or isinstance(module, nn.ZeroPad2d)
        return Geometry(
            size=geo.size + (high - low) * geo.jump,
            jump=geo.jump * stride,
            start=geo.start + (low + high) / 2 * geo.jump,
            exact=geo.exact and alike,
            is_global=geo.is_global,
        )
    if has_global_statistics(module):
        return geo  # the local path's field: see GLOBAL_STATISTICS
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)):
        return replace(geo, exact=False, is_global=True)
    return replace(geo, exact=False)


def cell_box(geo: Geometry, row: int, col: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Input pixels seen by output cell ``(row, col)``: ``(top, left, bottom, right)``, clipped,
    bottom/right exclusive."""
    height, width = image_size
    half = geo.size / 2.0
    cy = geo.start + row * geo.jump
    cx = geo.start + col * geo.jump
    top = max(0, math.floor(cy - half + 1e-6))
    left = max(0, math.floor(cx - half + 1e-6))
    bottom = min(height, math.ceil(cy + half - 1e-6))
    right = min(width, math.ceil(cx + half - 1e-6))
    return top, left, bottom, right


@dataclass(frozen=True)
class LayerCall:
    """One call of a leaf module during a traced forward pass."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    geometry: Geometry
    output_bytes: int


def trace(model: nn.Module, x: torch.Tensor) -> list[LayerCall]:
    """Run one forward pass and record every leaf-module call with shapes and receptive field.

    Tensors are followed by identity and version counter, so an in-place change between two
    modules (``out += identity``) or a new tensor from a functional op marks the chain broken.
    """
    # tensor id -> (version, field, the tensor: kept so that its id is not reused)
    known: dict[int, tuple[int, Geometry, torch.Tensor]] = {id(x): (x._version, INPUT_GEOMETRY, x)}
    calls: list[LayerCall] = []
    field_in: dict[int, Geometry] = {}  # id(call) -> the field of its input
    widest: dict[tuple[int, ...], Geometry] = {}  # spatial shape -> largest field seen at it

    def on_call(call: ModuleCall) -> None:
        first, geo_in = call.input, None
        if first is not None:
            entry = known.get(id(first))
            if entry is not None and entry[2] is first and entry[0] == call.input_version:
                geo_in = entry[1]
        if geo_in is None:
            # Off the chain (a residual sum, a concatenation, a functional op): the union of
            # the branches is at least the widest field recorded at this spatial size, which is
            # the main path in residual blocks. Say it is not exact.
            shape = call.input_shape
            fallback = widest.get(shape[2:] if shape is not None else (), None)
            geo_in = replace(fallback or INPUT_GEOMETRY, exact=False)
        field_in[id(call)] = geo_in

    def on_return(call: ModuleCall) -> None:
        geo_out = propagate(field_in.pop(id(call)), call.module)
        output, nbytes = call.output, 0
        if isinstance(output, torch.Tensor):
            nbytes = output.numel() * output.element_size()
            known[id(output)] = (call.output_version, geo_out, output)
            key = tuple(output.shape[2:])
            if key not in widest or widest[key].size <= geo_out.size:  # a tie: the latest call wins
                widest[key] = geo_out
        calls.append(LayerCall(call.path, call.module, call.input_shape, call.output_shape, geo_out, nbytes))

    traced = trace_calls(model, leaves_only=True, keep_tensors=False, on_call=on_call, on_return=on_return)
    with traced, eval_mode(model), torch.no_grad():
        model(x)
    return calls


def layer_geometry(model: nn.Module, x: torch.Tensor, name: str) -> Geometry:
    """Receptive field of the (last call of the) layer ``name``; containers use their last leaf."""
    calls = trace(model, x)
    matches = [c for c in calls if c.name == name or c.name.startswith(name + ".")]
    if not matches:
        raise KeyError(name)
    return matches[-1].geometry


def layer_geometries(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, Geometry]:
    """Receptive fields of several layers (module paths) from one traced forward pass.

    Each layer counts at its last call, a container at its last leaf (as in ``layer_geometry``).

    Raises:
        KeyError: a name that no leaf call matches.
    """
    calls = trace(model, x)
    found: dict[str, Geometry] = {}
    for name in names:
        matches = [c for c in calls if c.name == name or c.name.startswith(name + ".")]
        if not matches:
            raise KeyError(name)
        found[name] = matches[-1].geometry
    return found


def cell_boxes_xyxy(
    geo: Geometry, rows: list[int], cols: list[int], image_size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """``cell_box`` for many cells, as ``(x0, y0, x1, y1)`` (x1/y1 exclusive, clipped to the image):
    the order PIL's ``crop`` and most box formats use."""
    boxes = []
    for row, col in zip(rows, cols, strict=True):
        top, left, bottom, right = cell_box(geo, row, col, image_size)
        boxes.append((left, top, right, bottom))
    return boxes


def grid_origins(size: int, window: int, stride: int, cover_border: bool = False) -> tuple[int, ...]:
    """Top (or left) pixels of the positions of a sliding window along an axis of ``size`` pixels
    (occlusion's grid; ``cover_border``: one more position when the stride leaves a strip uncovered)."""
    count = (size - window) // stride + 1
    if cover_border:
        count = math.ceil((size - window) / stride) + 1
    return tuple(i * stride for i in range(count))
