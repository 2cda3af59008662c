"""Spatial arithmetic: output sizes, receptive fields, and cell -> input-box mapping.

Receptive fields follow the usual recurrence (per layer with kernel k, stride s, padding p,
dilation d and effective kernel k' = d(k-1)+1)::

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

from convscope.probes.hooks import eval_mode


@dataclass(frozen=True)
class Geometry:
    """Receptive field of one layer's output cells (along the height axis; square kernels)."""

    size: float
    jump: float
    start: float
    exact: bool = True
    is_global: bool = False


INPUT_GEOMETRY = Geometry(size=1.0, jump=1.0, start=0.5)

# Modules that keep the spatial grid cell-for-cell.
_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm,
)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def window_of(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """``(kernel, stride, padding, dilation)`` as (h, w) pairs for sliding-window layers, else None."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        padding = module.padding
        if isinstance(padding, str):  # "same"/"valid" convolutions
            kernel = _pair(module.kernel_size)
            dil = _pair(getattr(module, "dilation", 1))
            padding = (0, 0) if padding == "valid" else tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dil))
        stride = module.stride if module.stride is not None else module.kernel_size
        return (
            _pair(module.kernel_size),
            _pair(stride),
            _pair(padding),
            _pair(getattr(module, "dilation", 1)),
        )
    return None


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """N = floor((W - F_eff + 2P) / S) + 1, with F_eff = D(F-1)+1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def propagate(geo: Geometry, module: nn.Module) -> Geometry:
    """Receptive field after ``module`` given the one before it."""
    window = window_of(module)
    if window is not None:
        kernel, stride, padding, dilation = window
        square = (kernel[0] == kernel[1] and stride[0] == stride[1] and padding[0] == padding[1]
                  and dilation[0] == dilation[1])
        k_eff = dilation[0] * (kernel[0] - 1) + 1
        return Geometry(
            size=geo.size + (k_eff - 1) * geo.jump,
            jump=geo.jump * stride[0],
            start=geo.start + ((k_eff - 1) / 2 - padding[0]) * geo.jump,
            exact=geo.exact and square,
            is_global=geo.is_global,
        )
    if isinstance(module, nn.ZeroPad2d):
        top = module.padding[2] if len(module.padding) == 4 else module.padding[0]
        return replace(geo, start=geo.start - top * geo.jump)
    if isinstance(module, _POINTWISE):
        return geo
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
    known: dict[int, tuple[int, Geometry, torch.Tensor]] = {id(x): (x._version, INPUT_GEOMETRY, x)}
    calls: list[LayerCall] = []
    pending: dict[int, list[tuple[Geometry, tuple[int, ...] | None]]] = {}
    widest: dict[tuple[int, ...], Geometry] = {}  # spatial shape -> largest field seen at it
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def pre_hook(module: nn.Module, inputs: tuple[object, ...]) -> None:
        first = inputs[0] if inputs else None
        geo_in = None
        shape = None
        if isinstance(first, torch.Tensor):
            shape = tuple(first.shape)
            entry = known.get(id(first))
            if entry is not None and entry[2] is first and entry[0] == first._version:
                geo_in = entry[1]
        if geo_in is None:
            # Off the chain (a residual sum, a concatenation, a functional op): the union of
            # the branches is at least the widest field recorded at this spatial size, which is
            # the main path in residual blocks. Say it is not exact.
            fallback = widest.get(shape[2:] if shape is not None else (), None)
            geo_in = replace(fallback or INPUT_GEOMETRY, exact=False)
        pending.setdefault(id(module), []).append((geo_in, shape))

    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        geo_in, shape_in = pending[id(module)].pop()
        geo_out = propagate(geo_in, module)
        shape_out = None
        nbytes = 0
        if isinstance(output, torch.Tensor):
            shape_out = tuple(output.shape)
            nbytes = output.numel() * output.element_size()
            known[id(output)] = (output._version, geo_out, output)
            key = shape_out[2:]
            if key not in widest or widest[key].size <= geo_out.size:  # a tie: the latest call wins
                widest[key] = geo_out
        calls.append(LayerCall(names.get(module, "?"), module, shape_in, shape_out, geo_out, nbytes))

    try:
        for module in model.modules():
            if next(module.children(), None) is None:  # leaves only
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(hook))
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
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
