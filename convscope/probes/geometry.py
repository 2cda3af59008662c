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
The values are exact along a plain chain of modules. Every field has a kind (``Geometry.kind``):

- ``exact``: a plain chain of windows and pointwise layers. Layout-only steps (``permute``,
  ``reshape``, ``flatten`` of the grid into tokens) keep it, and so do layers applied per position:
  ``nn.Linear`` and ``nn.LayerNorm`` on a tensor of three or more dimensions (NHWC maps, tokens;
  the last dimension is taken to be the channels).
- ``approximate``: the pass leaves the chain: a residual addition or a concatenation of paths
  with different fields, indexing, a functional op without a rule. The value is the widest field
  among the paths (the main path of a residual block).
- ``global``: an output cell can depend on every input pixel: after attention (a product of two
  tensors that both carry a field: ``q @ k^T``, ``scaled_dot_product_attention``,
  ``multi_head_attention_forward``; windowed attention included, bounded in fact by its windows),
  global pooling (adaptive pools, a mean over the grid: squeeze-excite's gate makes its block's
  output global), or a fully connected layer on a flattened map.

``trace`` follows every tensor, not only module outputs: a ``TorchFunctionMode`` sees the torch
functions run between modules (and inside leaf modules without a rule of their own, such as
torchvision's ``Permute`` or ``StochasticDepth``) and gives each result a field from its inputs'.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from convscope.probes.hooks import ModuleCall, eval_mode, trace_calls


@dataclass(frozen=True)
class Geometry:
    """Receptive field of one layer's output cells (along the height axis; square kernels)."""

    size: float
    jump: float
    start: float
    exact: bool = True
    is_global: bool = False

    @property
    def kind(self) -> str:
        """``"exact"``, ``"approximate"`` or ``"global"`` (see the module's docstring)."""
        if self.is_global:
            return "global"
        return "exact" if self.exact else "approximate"


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


def per_position(module: nn.Module, input_shape: Sequence[int] | None) -> bool:
    """Does ``module`` act on each position of its input alone, along the last dimension?

    ``nn.Linear`` and ``nn.LayerNorm`` (over the last dimension) on a tensor of three or more
    dimensions: the NHWC maps of ConvNeXt and Swin, the tokens of a ViT. The last dimension is
    taken to be the channels (a Linear mixing positions, as MLP-Mixer's token mixing after a
    transpose, is not told apart). ``reach`` does not say so: it knows NCHW maps only."""
    if input_shape is None or len(input_shape) < 3:
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def propagate(geo: Geometry, module: nn.Module, input_shape: Sequence[int] | None = None) -> Geometry:
    """Receptive field after ``module`` given the one before it.

    Args:
        input_shape: the shape of the module's input, when known: a ``Linear`` or ``LayerNorm``
            on three or more dimensions works per position (``per_position``) and keeps the field;
            without it (or on a vector) a ``Linear`` is global.
    """
    if per_position(module, input_shape):
        return geo
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
    if has_global_statistics(module) or isinstance(module, nn.LayerNorm):
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
    """One call of a leaf module during a traced forward pass.

    ``function_mult_adds``: multiply-adds of the matrix products run inside a leaf module that
    has no rule of its own (its torch functions are followed one by one; see ``trace``)."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    geometry: Geometry
    output_bytes: int
    function_mult_adds: int = 0


@dataclass(frozen=True)
class FunctionCall:
    """One torch function run outside leaf modules that costs multiply-adds or reads parameters.

    Attributes:
        name: the module whose parameter it reads (``F.linear(x, self.qkv.weight)`` in Swin's
            attention: ``...attn.qkv``), else the module whose ``forward`` runs it (``...attn``
            for ``q @ k^T``); ``""`` for the model itself.
        op: the function's name (``linear``, ``matmul``, ``mul``, ``multi_head_attention_forward``).
        parameters: the model's parameters among its arguments.
        geometry: the field of its (first) tensor result; ``None`` when it returns no tensor.
        mult_adds: per image (see ``function_mult_adds``).
    """

    name: str
    op: str
    parameters: tuple[nn.Parameter, ...]
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    geometry: Geometry | None
    output_bytes: int
    mult_adds: int


# Torch functions by what they do to the positions of their tensor arguments (``__name__``).
_LAYOUT_OPS = frozenset({
    "permute", "transpose", "t", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "squeeze",
    "unsqueeze", "expand", "expand_as", "detach", "chunk", "split", "unbind", "tensor_split", "movedim",
    "moveaxis", "swapaxes", "swapdims", "__get__", "repeat_interleave",
})
_ELEMENTWISE_OPS = frozenset({
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__",
    "__rtruediv__", "__itruediv__", "__neg__", "neg", "abs", "pow", "__pow__", "sqrt", "rsqrt", "exp",
    "log", "where", "maximum", "minimum", "clamp", "clamp_", "clip", "relu", "relu_", "relu6", "gelu",
    "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_",
    "leaky_relu", "leaky_relu_", "elu", "selu", "celu", "softplus", "mish", "prelu", "erf", "dropout",
    "dropout2d", "feature_alpha_dropout", "alpha_dropout", "addcmul", "lerp", "masked_fill", "masked_fill_",
    # normalisations: per position, or statistics over the map (the local path's field: GLOBAL_STATISTICS)
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
    # concatenations: the union of the paths
    "cat", "concat", "concatenate", "stack", "hstack", "vstack",
})
# Products: global when two operands carry a field (attention's q @ k^T), per position with a weight.
_PRODUCT_OPS = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "baddbmm", "addmm", "einsum", "linear"})
_ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward", "_native_multi_head_attention"})
_GLOBAL_POOL_OPS = frozenset({
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d",
})
# Reductions and softmax over the dimensions in argument 1 (``norm``: argument 2) or ``dim=``.
_REDUCTION_OPS = frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm", "prod", "softmax",
    "log_softmax", "argmax", "argmin", "median", "nanmean", "nansum",
})
_IN_PLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"})


def _tensors_in(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def _union(fields: list[tuple[Geometry, int]]) -> Geometry:
    """The field of a result read from several paths: the widest (on a tie the latest made);
    approximate when the paths differ, global when one of them is."""
    widest = max(fields, key=lambda entry: (entry[0].size, entry[1]))[0]
    if any(geo.is_global for geo, _ in fields):
        return replace(widest, exact=False, is_global=True)
    if all(geo == fields[0][0] for geo, _ in fields):
        return fields[0][0]
    return replace(widest, exact=False)


def _everywhere(geo: Geometry) -> Geometry:
    return replace(geo, exact=False, is_global=True)


def _reduced_dims(name: str, args: Sequence[Any], kwargs: dict[str, Any], ndim: int) -> set[int] | None:
    """The dimensions a reduction runs over (``None``: all of them)."""
    position = 2 if name == "norm" else 1
    dims = kwargs.get("dim", args[position] if len(args) > position else None)
    if dims is None or isinstance(dims, torch.Tensor):
        return None
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    return {d % ndim for d in dims} if ndim else set()


def function_field(
    name: str, args: Sequence[Any], kwargs: dict[str, Any], fields: list[tuple[Geometry, int]]
) -> Geometry | None:
    """The field of the result of the torch function ``name`` given its tensor arguments' fields.

    ``fields``: ``(field, creation order)`` of the arguments that carry one (parameters and
    constants carry none). ``None`` when no argument carries a field. See the module docstring
    for the rules; a reduction over one dimension counts as per position when that dimension is
    the channels of an NCHW map (dimension 1 of four) or the last one (NHWC, tokens), and global
    otherwise."""
    if not fields:
        return None
    merged = _union(fields)
    if name in _ATTENTION_OPS or name in _GLOBAL_POOL_OPS:
        return _everywhere(merged)
    if name in _PRODUCT_OPS:
        return _everywhere(merged) if len(fields) >= 2 else merged
    if name in _REDUCTION_OPS:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) >= 2:  # torch.max(a, b): elementwise
            return merged
        ndim = tensors[0].dim() if tensors else 0
        if ndim <= 2:
            return merged  # a vector: no positions left to mix
        dims = _reduced_dims(name, args, kwargs, ndim)
        if dims is not None and len(dims) == 1 and (dims == {1} and ndim == 4 or dims == {ndim - 1}):
            return merged
        return _everywhere(merged)
    if name in _LAYOUT_OPS or name in _ELEMENTWISE_OPS:
        return merged
    return merged if merged.is_global else replace(merged, exact=False)


def function_mult_adds(name: str, args: Sequence[Any], kwargs: dict[str, Any], result: object) -> int:
    """Multiply-adds of one call of a torch function (all of its batch): matrix products
    (``linear``, ``matmul``, ``bmm``, ``einsum`` without ``...``), ``conv2d``, attention
    (``scaled_dot_product_attention``: both products; ``multi_head_attention_forward``: the
    projections too); 0 for everything else (elementwise ops, normalisations, softmax)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out = result if isinstance(result, torch.Tensor) else None
    if name == "linear" and out is not None:
        weight = kwargs.get("weight", tensors[1] if len(tensors) > 1 else None)
        return out.numel() * int(weight.shape[-1]) if weight is not None else 0
    if name in ("matmul", "__matmul__", "bmm", "mm") and out is not None and len(tensors) >= 2:
        return out.numel() * int(tensors[0].shape[-1])
    if name == "__rmatmul__" and out is not None and len(tensors) >= 2:
        return out.numel() * int(tensors[1].shape[-1])
    if name in ("addmm", "baddbmm") and out is not None and len(tensors) >= 3:
        return out.numel() * int(tensors[1].shape[-1])
    if name == "einsum" and args and isinstance(args[0], str) and "..." not in args[0]:
        operands = tensors if len(tensors) >= 2 else [t for t in _tensors_in(args[1:])]
        sizes: dict[str, int] = {}
        for letters, operand in zip(args[0].split("->")[0].replace(" ", "").split(","), operands, strict=False):
            sizes.update(zip(letters, (int(d) for d in operand.shape), strict=False))
        return math.prod(sizes.values()) if len(operands) >= 2 else 0
    if name == "conv2d" and out is not None and len(tensors) >= 2:
        weight = tensors[1]
        return out.numel() * int(weight.shape[1]) * int(weight.shape[2]) * int(weight.shape[3])
    if name == "scaled_dot_product_attention" and len(tensors) >= 3:
        query, key, value = tensors[:3]
        batch = query.numel() // (query.shape[-2] * query.shape[-1])
        return batch * int(query.shape[-2]) * int(key.shape[-2]) * (int(query.shape[-1]) + int(value.shape[-1]))
    if name == "multi_head_attention_forward" and len(tensors) >= 3:
        query, key = tensors[0], tensors[1]  # (L, N, E) and (S, N, E): batch-first is undone before
        length, source, embed = int(query.shape[0]), int(key.shape[0]), int(query.shape[-1])
        batch = query.numel() // (length * embed)
        projections = (length + 2 * source) * embed * embed + length * embed * embed
        return batch * (projections + 2 * length * source * embed)
    return 0


class _FieldMode(TorchFunctionMode):
    """Hands every torch function call to ``on_function`` with its result (see ``trace``)."""

    def __init__(self, on_function: Callable[[Any, Sequence[Any], dict[str, Any], list[tuple[Geometry, int]], object], None],
                 fields_of: Callable[[Sequence[Any], dict[str, Any]], list[tuple[Geometry, int]]]) -> None:
        super().__init__()
        self.on_function = on_function
        self.fields_of = fields_of
        self.muted = 0  # > 0 inside a leaf module whose rule gives its field

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.muted:
            return func(*args, **kwargs)
        fields = self.fields_of(args, kwargs)  # before the call: an in-place op moves the version
        result = func(*args, **kwargs)
        self.on_function(func, args, kwargs, fields, result)
        return result


_RULED = (nn.ZeroPad2d, nn.LayerNorm, nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
          *POINTWISE, *GLOBAL_STATISTICS)


def has_rule(module: nn.Module) -> bool:
    """Does ``propagate`` know ``module`` (a window, padding, a pointwise layer, a normalisation,
    a linear layer, global pooling, flatten)? Other leaf modules are followed function by function."""
    return (
        window_of(module) is not None
        or isinstance(module, _RULED)
    )


def _version(tensor: torch.Tensor) -> int:
    return -1 if tensor.is_inference() else tensor._version


def trace_steps(model: nn.Module, x: torch.Tensor) -> list[LayerCall | FunctionCall]:
    """Run one forward pass and record every leaf-module call and every costly torch function.

    Leaf modules with a rule (``has_rule``) get their field from ``propagate``; every other torch
    function gets one from its arguments' (``function_field``): between modules, and inside leaf
    modules without a rule. Tensors are followed by identity and version counter, so an
    in-place change (``out += identity``) gives the tensor the field of the sum. A leaf module
    whose input carries no field (it came out of a tuple a rule-bound module returned) starts
    from the widest field recorded at its input's spatial size, marked approximate.

    Returns:
        in the order they returned: one ``LayerCall`` per leaf-module call, and one
        ``FunctionCall`` per torch function run outside leaf modules that costs multiply-adds or
        reads a parameter (Swin's ``F.linear(x, self.qkv.weight)``, ConvNeXt's ``layer_scale *``).
    """
    batch = max(int(x.shape[0]), 1) if x.dim() else 1
    order = iter(range(1 << 62))
    # id(tensor) -> (a weak reference to it, its version, its field, when it was made)
    known: dict[int, tuple[weakref.ReferenceType[torch.Tensor], int, Geometry, int]] = {}
    steps: list[LayerCall | FunctionCall] = []
    widest: dict[tuple[int, ...], Geometry] = {}  # spatial shape -> largest field seen at it
    # a parameter -> the row it names: its module, or its own name when the model holds it (ViT's class_token)
    owners = {
        id(p): path or name
        for path, module in model.named_modules()
        for name, p in module.named_parameters(recurse=False)
    }
    stack: list[tuple[ModuleCall, Geometry | None, list[int]]] = []  # open calls: field in, mult-adds inside

    def put(tensor: torch.Tensor, geo: Geometry) -> None:
        known[id(tensor)] = (weakref.ref(tensor), _version(tensor), geo, next(order))

    def get(tensor: torch.Tensor) -> tuple[Geometry, int] | None:
        entry = known.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != _version(tensor):
            return None
        return entry[2], entry[3]

    def fields_of(args: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[Geometry, int]]:
        found = []
        for tensor in _tensors_in((args, kwargs)):
            entry = get(tensor)
            if entry is not None:
                found.append(entry)
        return found

    def on_function(func: Any, args: Sequence[Any], kwargs: dict[str, Any], fields: list[tuple[Geometry, int]],
                    result: object) -> None:
        name = getattr(func, "__name__", "")
        geo = function_field(name, args, kwargs, fields)
        outputs = list(_tensors_in(result))
        in_place = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))
        if in_place and args and isinstance(args[0], torch.Tensor):
            outputs = [args[0]]
        if geo is not None:
            for tensor in outputs:
                put(tensor, geo)
        mult_adds = function_mult_adds(name, args, kwargs, result) // batch
        if stack and not next(stack[-1][0].module.children(), None):  # inside a leaf without a rule
            stack[-1][2][0] += mult_adds
            return
        parameters = tuple(t for t in _tensors_in((args, kwargs)) if isinstance(t, nn.Parameter) and id(t) in owners)
        if not mult_adds and (not parameters or not outputs or name == "__get__"):
            return  # neither cost nor a parameter read into a tensor (``weight.dtype``, ``.T`` comes back)
        first_in = next(_tensors_in(args), None)
        out = outputs[0] if outputs else None
        steps.append(FunctionCall(
            name=owners[id(parameters[0])] if parameters else (stack[-1][0].path if stack else ""),
            op=name,
            parameters=parameters,
            input_shape=tuple(first_in.shape) if first_in is not None else None,
            output_shape=tuple(out.shape) if out is not None else None,
            geometry=geo if out is not None else None,
            output_bytes=out.numel() * out.element_size() if out is not None and not in_place else 0,
            mult_adds=mult_adds,
        ))

    mode = _FieldMode(on_function, fields_of)

    def on_call(call: ModuleCall) -> None:
        leaf = next(call.module.children(), None) is None
        geo_in: Geometry | None = None
        if leaf:
            entry = get(call.input) if call.input is not None else None
            if entry is not None:
                geo_in = entry[0]
            else:
                # Off the traced tensors (out of a tuple): at least the widest field recorded at
                # this spatial size, which is the main path in residual blocks. Approximate.
                shape = call.input_shape
                fallback = widest.get(shape[2:] if shape is not None else (), None)
                geo_in = replace(fallback or INPUT_GEOMETRY, exact=False)
            if has_rule(call.module):
                mode.muted += 1
        stack.append((call, geo_in, [0]))

    def on_return(call: ModuleCall) -> None:
        _, geo_in, inside = stack.pop()
        if geo_in is None:
            return  # a container: its tensors were followed function by function
        output, nbytes = call.output, 0
        if has_rule(call.module):
            mode.muted -= 1
            geo_out = propagate(geo_in, call.module, call.input_shape)
        else:
            entry = get(output) if isinstance(output, torch.Tensor) else None
            geo_out = entry[0] if entry is not None else replace(geo_in, exact=False)
        if isinstance(output, torch.Tensor):
            nbytes = output.numel() * output.element_size()
            put(output, geo_out)
            key = tuple(output.shape[2:])
            if key not in widest or widest[key].size <= geo_out.size:  # a tie: the latest call wins
                widest[key] = geo_out
        steps.append(LayerCall(call.path, call.module, call.input_shape, call.output_shape, geo_out, nbytes, inside[0]))

    put(x, INPUT_GEOMETRY)
    traced = trace_calls(model, keep_tensors=False, on_call=on_call, on_return=on_return)
    with traced, eval_mode(model), torch.no_grad(), mode:
        model(x)
    return steps


def trace(model: nn.Module, x: torch.Tensor) -> list[LayerCall]:
    """Run one forward pass and record every leaf-module call with shapes and receptive field
    (``trace_steps`` without the torch functions)."""
    return [step for step in trace_steps(model, x) if isinstance(step, LayerCall)]


def layer_geometry(model: nn.Module, x: torch.Tensor, name: str) -> Geometry:
    """Receptive field of the (last call of the) layer ``name``; containers use their last leaf."""
    calls = trace(model, x)
    matches = [c for c in calls if c.name == name or c.name.startswith(name + ".")]
    if not matches:
        raise KeyError(name)
    return matches[-1].geometry


# Receptive fields depend on the module tree and the input size only, never on the weights: per
# model, (input shape, layer, tree signature) -> Geometry, so a method that needs one layer's
# field once per call (deconv's boxes) traces only the first call at each size.
_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Geometry]] = weakref.WeakKeyDictionary()


def _tree_signature(model: nn.Module) -> tuple[Any, ...]:
    """What a receptive field depends on: each module's path, type and window settings."""
    return tuple((name, type(module).__name__, window_of(module)) for name, module in model.named_modules())


def known_geometry(model: nn.Module, input_shape: Sequence[int], name: str) -> Geometry | None:
    """The receptive field of ``name`` remembered by ``remember_geometry`` (or None)."""
    return _KNOWN.get(model, {}).get((tuple(input_shape), name, _tree_signature(model)))


def remember_geometry(model: nn.Module, input_shape: Sequence[int], name: str, geometry: Geometry) -> None:
    """Remember a traced receptive field for ``known_geometry`` (dropped with the model)."""
    _KNOWN.setdefault(model, {})[(tuple(input_shape), name, _tree_signature(model))] = geometry


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
