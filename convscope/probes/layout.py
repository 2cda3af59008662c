"""Layouts measured, never assumed: what each layer's output tensor is.

One traced forward at the model's input size (batch 1, zeros) records every module's output
shape and, through a ``TorchFunctionMode``, which axis of every tensor is the batch, the
channels, a row, a column or a token position (``_Axes``): the input is ``NCHW``; convolutions
and pooling give ``NCHW``; ``permute``/``transpose``/``flatten``/``reshape`` move or merge the
labels; ``linear`` keeps the leading axes and makes the last one channels; an op whose output
has the shape of one of its inputs inherits that input's labels.

From the shape and the labels each output gets a ``Layout``:

- ``NCHW``, ``NHWC``: maps. Shapes decide when exactly one ordering has a grid that matches the
  input's aspect (rows ~ H/s, columns ~ W/s for one stride s); when both or neither match
  (channels equal to the grid's side), the traced labels decide; when they cannot, the layer is
  ``other`` and refused.
- ``tokens``: ``(N, L, C)`` with ``L = h·w + k`` for ``k`` leading class/register tokens.
- ``vector``: ``(N, C)``.
- ``other``: anything else, with the reason.

``Layout.to_nchw`` turns a map or tokens into an ``(N, C, h, w)`` view that gradients flow
through: the same as pytorch-grad-cam's documented ``reshape_transform``, with nothing for the
user to write. The measurement also gives the stages (at each resolution, the map the first
downsampling module reads, or timm's ``feature_info``) and the default CAM layer (the last spatial map before
global pooling). It is cached per module and input size: one forward per model per process.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from convscope.errors import UnknownLayer

MAP_KINDS = ("NCHW", "NHWC")
MAX_EXTRA_TOKENS = 16  # class, distillation and register tokens before the grid (ViT, DeiT, ...)

# Labels of one axis: N batch, C channels, H rows, W columns, L flattened positions, ? unknown.
_Axes = tuple[str, ...]
_NCHW: _Axes = ("N", "C", "H", "W")
_MAP_OPS = {
    "conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "lp_pool2d", "batch_norm", "instance_norm", "group_norm", "interpolate",
    "upsample", "pixel_shuffle", "pixel_unshuffle", "local_response_norm",
}
_AXIS_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "reshape", "view", "flatten",
               "unflatten", "contiguous"}
# Modules that only move axes or pass their input on: never a stage or a default layer.
_PASS_THROUGH = ("Identity", "Dropout", "Permute", "Flatten", "Unflatten", "DropPath", "StochasticDepth")
_GLOBAL_POOLS = ("AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "SelectAdaptivePool2d", "AdaptiveAvgMaxPool2d")


@dataclass(frozen=True)
class Layout:
    """What one layer's output is.

    Attributes:
        kind: ``"NCHW"``, ``"NHWC"``, ``"tokens"``, ``"vector"`` or ``"other"``.
        shape: the output shape for one image at the model's input size (``None``: no tensor).
        channels: the channel count (``None`` for ``other``).
        grid: ``(h, w)`` of a map or of the tokens, else ``None``.
        extra_tokens: leading tokens that are not grid positions (a class token is 1).
        why: for ``other``, what the output is; for a map decided by the traced graph, how.
    """

    kind: str
    shape: tuple[int, ...] | None = None
    channels: int | None = None
    grid: tuple[int, int] | None = None
    extra_tokens: int = 0
    why: str = ""

    @property
    def spatial(self) -> bool:
        """True when ``to_nchw`` gives a map (NCHW, NHWC, or tokens on a grid)."""
        return self.kind in MAP_KINDS or (self.kind == "tokens" and self.grid is not None)

    def describe(self) -> str:
        """``"NCHW 256×14×14"``, ``"tokens 197×768 (14×14 grid + 1)"``, ``"vector 1000"``..."""
        if self.kind in MAP_KINDS and self.grid is not None:
            return f"{self.kind} {self.channels}×{self.grid[0]}×{self.grid[1]}"
        if self.kind == "tokens" and self.shape is not None:
            grid = f" ({self.grid[0]}×{self.grid[1]} grid" if self.grid else " (no grid"
            extra = f" + {self.extra_tokens})" if self.extra_tokens else ")"
            return f"tokens {self.shape[1]}×{self.shape[2]}{grid}{extra}"
        if self.kind == "vector":
            return f"vector {self.channels}"
        return f"other: {self.why}" if self.why else "other"

    def conversion(self) -> str | None:
        """How ``to_nchw`` reads this layout (``None`` for NCHW): recorded in the methods' JSON."""
        if self.kind == "NHWC":
            return "permute(0, 3, 1, 2)"
        if self.kind == "tokens" and self.grid is not None:
            drop = f"drop {self.extra_tokens} leading token{'s' if self.extra_tokens != 1 else ''}, " if self.extra_tokens else ""
            return f"{drop}unflatten tokens to {self.grid[0]}×{self.grid[1]}, permute(0, 3, 1, 2)"
        return None

    def record(self) -> dict[str, Any]:
        """The JSON record: ``{"layout": kind, "converted": how or None}``."""
        return {"layout": self.kind, "converted": self.conversion()}

    def to_nchw(self, tensor: torch.Tensor, name: str = "layer") -> torch.Tensor:
        """The output as an ``(N, C, h, w)`` view (no copy; gradients flow through it).

        Raises:
            UnknownLayer: the layout is not a spatial map, or the tensor does not fit it.
        """
        if self.kind == "NCHW" and tensor.dim() == 4:
            return tensor
        if self.kind == "NHWC" and tensor.dim() == 4:
            return tensor.permute(0, 3, 1, 2)
        if self.kind == "tokens" and self.grid is not None and tensor.dim() == 3:
            body = tensor[:, self.extra_tokens:, :]
            rows, cols = _scaled_grid(body.shape[1], self.grid)
            if rows * cols != body.shape[1]:
                raise UnknownLayer(name, f"has {body.shape[1]} tokens, which do not fill a grid like {self.grid[0]}×{self.grid[1]}")
            return body.unflatten(1, (rows, cols)).permute(0, 3, 1, 2)
        raise not_a_map(name, self)


    def from_nchw(self, nchw: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_nchw``: ``original``'s values rebuilt from ``nchw`` (and, for
        tokens, ``original``'s extra tokens), as a new tensor with ``original``'s strides. A
        hook hands this to the rest of the network so that the class score depends on the
        stored ``nchw`` view and its gradient reaches it."""
        if self.kind == "NHWC":
            return nchw.permute(0, 2, 3, 1).clone()
        if self.kind == "tokens":
            positions = nchw.flatten(2).transpose(1, 2)
            if self.extra_tokens:
                positions = torch.cat([original[:, : self.extra_tokens], positions], dim=1)
            return positions.clone()
        return nchw.clone()


def not_a_map(name: str, layout: Layout) -> UnknownLayer:
    """The one-line refusal of a layer that is not a spatial map (naming its measured layout)."""
    if layout.shape is None and layout.why == DID_NOT_RUN:
        return UnknownLayer(
            name, "did not run during the forward pass, or returned something other than a tensor",
            "pick a layer the model calls (see 'convscope layers')",
        )
    shape = f"has output shape {(1, *layout.shape[1:])}, " if layout.shape is not None else ""
    return UnknownLayer(
        name, f"{shape}not a (N, C, H, W) feature map (layout {layout.describe()})",
        "pick a layer whose layout is NCHW, NHWC or tokens on a grid (see 'convscope layers')",
    )


DID_NOT_RUN = "it did not run in the forward pass"


def _scaled_grid(count: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The grid of ``count`` positions with the measured grid's aspect (another input size)."""
    rows, cols = grid
    if rows * cols == count:
        return grid
    guess = max(1, round(math.sqrt(count * rows / cols)))
    for r in (guess, guess - 1, guess + 1):
        if r > 0 and count % r == 0:
            return r, count // r
    return rows, cols


NCHW_LAYOUT = Layout("NCHW", why="a built-in CNN: every map is NCHW")


@dataclass(frozen=True)
class Measured:
    """One model's measured layers.

    Attributes:
        layouts: module path -> layout of its output (its last call, as ``Capture.last`` reads).
        order: module paths in the order their (first) call returned.
        calls: module path -> how many times it ran in one forward.
        stages: ``stage1``..``stageK`` -> module path.
        cam_layer: the last spatial map before global pooling (``""`` when the model has none).
        output: the layout of the model's own output.
        input_size: the ``(C, H, W)`` measured at.
        failure: ``""``, or why the forward failed (then only the layers that ran before the
            failure are measured, and there are no stages); ``cause`` the exception.
    """

    layouts: dict[str, Layout]
    order: tuple[str, ...]
    calls: dict[str, int]
    stages: dict[str, str]
    cam_layer: str
    output: Layout
    input_size: tuple[int, ...]
    failure: str = ""
    cause: BaseException | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------- axis labels through the graph


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _dims(args: Sequence[Any], start: int = 1) -> list[int]:
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        rest = rest[0]
    return [int(d) for d in rest]


def _reshaped(labels: _Axes, before: Sequence[int], after: Sequence[int]) -> _Axes:
    """Labels after a reshape, by matching groups of axes whose sizes multiply to the same."""
    out: list[str] = []
    i = j = 0
    while i < len(before) or j < len(after):
        gi, gj = [i], [j]
        pi = before[i] if i < len(before) else 1
        pj = after[j] if j < len(after) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(before):
                pi *= before[i]
                gi.append(i)
                i += 1
            elif j < len(after):
                pj *= after[j]
                gj.append(j)
                j += 1
            else:
                return ("?",) * len(after)
        source = [labels[k] for k in gi if k < len(labels) and before[k] != 1] or ["?"]
        kept = [k for k in gj if k < len(after)]
        big = [k for k in kept if after[k] != 1]
        if len(source) == 1 and len(big) <= 1:
            out.extend(source[0] if after[k] != 1 else "?" for k in kept)
        elif source == ["H", "W"] and len(big) == 1:
            out.extend("L" if after[k] != 1 else "?" for k in kept)
        elif source == ["L"] and len(big) == 2:
            names = iter(("H", "W"))
            out.extend(next(names) if after[k] != 1 else "?" for k in kept)
        else:
            out.extend("?" for _ in kept)
    return tuple(out[: len(after)])


class _Labeller(TorchFunctionMode):
    """Follows axis labels from the input through every torch call of one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, tuple[torch.Tensor, _Axes]] = {}  # id -> (tensor kept alive, labels)
        self.origin: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (view, what it views)

    def source(self, tensor: object) -> object:
        """The tensor ``tensor`` is an axis move of (permute, reshape...), followed to its end."""
        seen = 0
        while isinstance(tensor, torch.Tensor) and id(tensor) in self.origin and seen < 64:
            view, base = self.origin[id(tensor)]
            if view is not tensor:
                break
            tensor, seen = base, seen + 1
        return tensor

    def set(self, tensor: torch.Tensor, labels: _Axes) -> None:
        if len(labels) == tensor.dim():
            self.labels[id(tensor)] = (tensor, labels)

    def get(self, tensor: object) -> _Axes | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self.labels.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            try:
                labels = self._rule(getattr(func, "__name__", ""), args, kwargs, out)
            except Exception:  # noqa: BLE001 - a rule never breaks the user's forward
                labels = None
            if labels is not None:
                self.set(out, labels)
            first = args[0] if args else None
            if getattr(func, "__name__", "") in _AXIS_MOVES and isinstance(first, torch.Tensor):
                self.origin[id(out)] = (out, first)
        return out

    def _rule(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], out: torch.Tensor) -> _Axes | None:
        first = args[0] if args else None
        first_labels = self.get(first)
        if name in _MAP_OPS and out.dim() == 4:
            return _NCHW
        if first_labels is not None and isinstance(first, torch.Tensor):
            if name == "permute":
                dims = _dims(args) if len(args) > 1 else list(kwargs.get("dims", ()))
                return tuple(first_labels[d] for d in dims)
            if name in ("transpose", "swapaxes", "swapdims"):
                a, b = (int(x) % first.dim() for x in (args[1:3] if len(args) >= 3 else (kwargs["dim0"], kwargs["dim1"])))
                swapped = list(first_labels)
                swapped[a], swapped[b] = swapped[b], swapped[a]
                return tuple(swapped)
            if name in ("flatten", "reshape", "view", "unflatten", "view_as", "reshape_as"):
                return _reshaped(first_labels, tuple(first.shape), tuple(out.shape))
            if name == "linear" and out.dim() == first.dim():
                return (*first_labels[:-1], "C")
            if name == "matmul" and out.shape[:-1] == first.shape[:-1]:
                return (*first_labels[:-1], "C")
            if name == "__getitem__" and out.dim() == first.dim():
                return first_labels
        if name == "cat" and first is not None:  # the joined axis keeps its label
            for inner in _tensors(first):
                labelled = self.get(inner)
                if labelled is not None and inner.dim() == out.dim():
                    return labelled
        for tensor in _tensors(list(args) + list(kwargs.values())):  # same shape as an input
            labels = self.get(tensor)
            if labels is not None and tensor.shape == out.shape:
                return labels
        return None


# ---------------------------------------------------------------- deciding one output's layout


def _grid_like(rows: int, cols: int, size: tuple[int, int], slack: float = 1.0) -> bool:
    """Do ``rows × cols`` look like the input's ``H × W`` at one stride (each side within
    ``slack`` cells of ``H / s``, ``W / s``; rounding at odd sizes costs up to one cell)?"""
    if rows < 1 or cols < 1:
        return False
    height, width = size
    if height == width:
        return rows == cols
    return abs(width * rows / height - cols) <= slack and abs(height * cols / width - rows) <= slack


def _token_grid(count: int, size: tuple[int, int]) -> tuple[tuple[int, int], int] | None:
    """``(grid, extra)`` with ``count = h·w + extra`` and a grid like the input's, or ``None``."""
    height, width = size
    for extra in range(MAX_EXTRA_TOKENS + 1):
        positions = count - extra
        if positions < 1:
            break
        rows = max(1, round(math.sqrt(positions * height / width)))
        for r in (rows, rows - 1, rows + 1):
            if r > 0 and positions % r == 0 and _grid_like(r, positions // r, size, 0.5) and positions > 1:
                return (r, positions // r), extra
    return None


def decide(shape: tuple[int, ...], labels: _Axes | None, size: tuple[int, int]) -> Layout:
    """The layout of one output from its shape (batch 1), its traced axis labels and the input size."""
    dims = len(shape)
    if dims == 2:
        return Layout("vector", shape, shape[1])
    if dims == 4:
        _, a, b, c = shape
        nchw, nhwc = _grid_like(b, c, size), _grid_like(a, b, size)
        traced = labels[1:] if labels is not None else None
        if traced == ("C", "H", "W") and nchw:
            return Layout("NCHW", shape, a, (b, c))
        if traced == ("H", "W", "C") and nhwc:
            return Layout("NHWC", shape, c, (a, b))
        if nchw and not nhwc:
            return Layout("NCHW", shape, a, (b, c))
        if nhwc and not nchw:
            return Layout("NHWC", shape, c, (a, b))
        if traced == ("C", "H", "W"):
            return Layout("NCHW", shape, a, (b, c), why="decided by the traced graph")
        if traced == ("H", "W", "C"):
            return Layout("NHWC", shape, c, (a, b), why="decided by the traced graph")
        return Layout("other", shape, why=f"cannot tell channels from positions in shape {shape[1:]}")
    if dims == 3:
        _, a, b = shape
        traced = labels[1:] if labels is not None else None
        if traced is not None and traced[1] == "C" and traced[0] in ("L", "?"):
            found = _token_grid(a, size)
            return Layout("tokens", shape, b, found[0] if found else None, found[1] if found else 0)
        if traced is not None and traced[0] == "C":
            return Layout("other", shape, why=f"channels before positions in shape {shape[1:]}")
        first, second = _token_grid(a, size), _token_grid(b, size)
        if first is not None and second is None:
            return Layout("tokens", shape, b, first[0], first[1])
        return Layout("other", shape, why=f"cannot tell tokens from channels in shape {shape[1:]}")
    if dims == 0:
        return Layout("other", shape, why="a scalar")
    return Layout("other", shape, why=f"a {dims}-D tensor of shape {shape}")


def _not_tensor(output: object) -> Layout:
    if isinstance(output, dict):
        return Layout("other", why=f"returns a dict with keys {', '.join(map(str, list(output)[:6]))}")
    if isinstance(output, (list, tuple)):
        kind = type(output).__name__
        return Layout("other", why=f"returns a {kind} of {len(output)} item{'s' if len(output) != 1 else ''}")
    return Layout("other", why=f"returns {type(output).__name__}, not a tensor")


# ---------------------------------------------------------------- measuring a model


@dataclass
class _Call:
    path: str
    module: nn.Module
    parent: _Call | None
    input: object = None
    output: object = None
    children: list[_Call] = field(default_factory=list)


_SIZES_KEPT = 8
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Measured]] = weakref.WeakKeyDictionary()


def cached_layout(module: nn.Module, path: str) -> Layout | None:
    """The layout of ``path`` from a measurement already made (any input size), or ``None``:
    never runs the model (for renderers, which record layouts but must not compute)."""
    for found in _CACHE.get(module, {}).values():
        if path in found.layouts:
            return found.layouts[path]
    return None


def measure(loaded: Any, input_size: Sequence[int] | None = None, *, partial: bool = False) -> Measured:
    """``measure_module`` for a ``LoadedModel`` at ``input_size`` (``(C, H, W)``; default: its
    preprocessing's input size)."""
    return measure_module(loaded.module, input_size=tuple(input_size or loaded.preprocess.input_size),
                          partial=partial)


def measure_module(module: nn.Module, *, input_size: Sequence[int], partial: bool = False) -> Measured:
    """Trace one forward of zeros at ``(1, *input_size)`` and measure every module's output.

    Cached per module, input size and module tree (a surgery that swaps a submodule measures
    again). The module runs in eval mode under ``no_grad``; its own flags are restored.

    Args:
        partial: when the forward fails part-way (a classifier that does not fit this size, for
            a method such as deconv that runs only up to its layer), return what ran before the
            failure (``Measured.failure`` says why) instead of raising.

    Raises:
        UnknownLayer: the forward fails at this input size (named ``model``), unless ``partial``.
    """
    if any(s is None for s in input_size):
        raise UnknownLayer("model", f"has no fixed input size to measure its layers at ({tuple(input_size)})",
                           "give an image, or a preprocessing with a crop size")
    size = tuple(int(s) for s in input_size)
    key = (size, tuple(id(m) for m in module.modules()))
    per_module = _CACHE.setdefault(module, {})
    if key not in per_module:
        if len(per_module) >= _SIZES_KEPT:  # a changed tree or many sizes: start again
            per_module.clear()
        per_module[key] = _measure(module, size)
    found = per_module[key]
    if found.failure and not partial:
        raise UnknownLayer("model", found.failure, "check the model's input size (its preprocessing)") from found.cause
    return found


def _measure(module: nn.Module, size: tuple[int, ...]) -> Measured:
    from convscope.probes.hooks import eval_mode

    paths = {m: p for p, m in module.named_modules()}
    first: torch.Tensor | None = next(module.parameters(), None)
    if first is None:
        first = next(module.buffers(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    image = torch.zeros((1, *size), device=device, dtype=dtype)
    labeller = _Labeller()
    labeller.set(image, _NCHW if image.dim() == 4 else ("?",) * image.dim())
    stack: list[_Call] = []
    returned: list[_Call] = []
    roots: list[_Call] = []
    observed: dict[str, tuple[tuple[int, ...] | None, _Axes | None, object]] = {}

    def pre_hook(mod: nn.Module, inputs: tuple[object, ...]) -> None:
        call = _Call(paths.get(mod, "?"), mod, stack[-1] if stack else None, inputs[0] if inputs else None)
        (call.parent.children if call.parent else roots).append(call)
        stack.append(call)

    def hook(mod: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        call = stack.pop()
        call.output = output
        returned.append(call)
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        observed[call.path] = (shape, labeller.get(output), output)

    handles = []
    try:
        for sub in module.modules():
            handles.append(sub.register_forward_pre_hook(pre_hook))
            handles.append(sub.register_forward_hook(hook))
        with eval_mode(module), torch.no_grad(), labeller:
            module(image)
    except Exception as exc:  # noqa: BLE001 - the user's forward failed: keep what ran before it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        failure = f"its forward fails on a {tuple(image.shape)} input: {reason[:200]}"
        cause: BaseException | None = exc
    else:
        failure, cause = "", None
    finally:
        for handle in handles:
            handle.remove()

    hw = (size[-2], size[-1]) if len(size) >= 2 else (1, 1)
    layouts: dict[str, Layout] = {}
    for path, (shape, labels, output) in observed.items():
        layouts[path] = decide(shape, labels, hw) if shape is not None else _not_tensor(output)
    counts: dict[str, int] = {}
    order: list[str] = []
    for call in returned:
        counts[call.path] = counts.get(call.path, 0) + 1
        if counts[call.path] == 1:
            order.append(call.path)
    output_layout = layouts.pop("", Layout("other", why="the model did not run"))
    order = [p for p in order if p]
    if failure:  # a partial trace: the layers that ran keep their layouts; no stages
        return Measured(layouts, tuple(order), counts, {}, "", Layout("other", why=failure), size, failure, cause)
    stages, cam_layer = _stages(module, returned, layouts, counts, image, labeller)
    return Measured(layouts, tuple(order), counts, stages, cam_layer, output_layout, size)


def _candidate(call: _Call, layouts: dict[str, Layout], counts: dict[str, int]) -> bool:
    layout = layouts.get(call.path)
    if not call.path or call.path == "?" or layout is None or not layout.spatial or counts.get(call.path, 0) != 1:
        return False
    if layout.grid is None or layout.grid[0] * layout.grid[1] <= 1:
        return False
    name = type(call.module).__name__
    return name not in _PASS_THROUGH and name not in _GLOBAL_POOLS


def _settle(call: _Call, image: torch.Tensor, layouts: dict[str, Layout], counts: dict[str, int]) -> _Call:
    """The module to name for ``call``'s output: the outermost module that returns the same
    tensor, descending into a container that starts from the network's input (VGG's
    ``features`` becomes its last child; ResNet's ``layer4`` stays ``layer4``)."""
    while (call.parent is not None and call.parent.path and call.parent.output is call.output
           and _candidate(call.parent, layouts, counts)):
        call = call.parent
    while call.input is image and any(_grid(c, layouts) != _grid(call, layouts) for c in call.children):
        same = [c for c in call.children if c.output is call.output and _candidate(c, layouts, counts)]
        if not same:
            break
        call = same[-1]
    return call


def _grid(call: _Call, layouts: dict[str, Layout]) -> tuple[int, int] | None:
    layout = layouts.get(call.path)
    return layout.grid if layout is not None else None


def _stages(
    module: nn.Module, returned: list[_Call], layouts: dict[str, Layout], counts: dict[str, int], image: torch.Tensor,
    labeller: _Labeller,
) -> tuple[dict[str, str], str]:
    """Stages: at each resolution, the map that the first downsampling module reads (the
    outermost such module: ResNet's ``layer2`` reads ``layer1``; an inverted-residual stage
    reads the block before it, not the expansion inside itself); the last resolution ends at
    the default CAM layer, the last spatial map before global pooling."""
    producer: dict[int, _Call] = {}  # id(tensor) -> the last candidate call that returned it
    last: _Call | None = None
    for call in returned:
        if _candidate(call, layouts, counts):
            producer[id(call.output)] = call
            last = call
    cam_layer = _settle(last, image, layouts, counts).path if last is not None else ""
    timm = _timm_stages(module)
    if timm:
        return timm, cam_layer
    found: dict[tuple[int, int], str] = {}
    for call in _started(returned):
        read = labeller.source(call.input)  # through permutes and reshapes
        source = producer.get(id(read)) if isinstance(read, torch.Tensor) else None
        here, there = _grid(call, layouts), _grid(source, layouts) if source is not None else None
        if source is None or here is None or there is None or there in found or not _candidate(call, layouts, counts):
            continue
        if here[0] * here[1] < there[0] * there[1]:
            found[there] = _settle(source, image, layouts, counts).path
    if last is not None:
        found.setdefault(_grid(last, layouts) or (0, 0), cam_layer)
    stages: dict[str, str] = {}
    for path in found.values():
        if path not in stages.values():
            stages[f"stage{len(stages) + 1}"] = path
    return stages, cam_layer


def _started(returned: list[_Call]) -> list[_Call]:
    """The calls in the order they started (outer modules before their children)."""
    roots: list[_Call] = []
    seen: set[int] = set()
    for call in returned:
        top = call
        while top.parent is not None:
            top = top.parent
        if id(top) not in seen:
            seen.add(id(top))
            roots.append(top)
    order: list[_Call] = []
    pending = list(reversed(roots))
    while pending:
        call = pending.pop()
        order.append(call)
        pending.extend(reversed(call.children))
    return order


def _timm_stages(module: nn.Module) -> dict[str, str]:
    """``stage1``..``stageK`` from a timm model's ``feature_info``, when it has one."""
    info = getattr(module, "feature_info", None)
    if not isinstance(info, list) or not info or not all(isinstance(i, dict) and "module" in i for i in info):
        return {}
    names = {name for name, _ in module.named_modules()}
    stages = {f"stage{i + 1}": str(item["module"]) for i, item in enumerate(info)}
    return stages if all(path in names for path in stages.values()) else {}


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-d tensor stored channels-last (and not also plainly contiguous,
    as a 1x1 kernel is), else ``contiguous_format``: the layout to give a tensor made from it."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def network_memory_format(module: nn.Module) -> torch.memory_format:
    """``channels_last`` when the network's convolutions are stored so (``load_model`` sets it per
    model): inputs laid out the same way run without a layout copy at the first layer."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and memory_format_of(conv.weight) == torch.channels_last:
            return torch.channels_last
    return torch.contiguous_format
