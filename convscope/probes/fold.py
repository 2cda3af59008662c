"""BatchNorm folded into the convolution before it, in an inference copy of a model.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``, so when it reads nothing but one convolution's output it can be merged into that
convolution: the weight of each output channel is multiplied by ``gamma / sqrt(var + eps)`` and
the bias becomes ``(bias - mean) * scale + beta``. The copy runs one pass over each map instead of
two. Measured on EfficientNet-Lite0 (batch 32, channels-last, CPU): 20-35% less forward time;
probabilities differ from the unfolded model by under 1e-6.

Which pairs fold is measured, not assumed: one traced forward (batch 1) records, for every
BatchNorm call, the module whose output it read, and how many operations read that output. A
pair folds only when the BatchNorm's input is the output of a ``Conv2d`` (called once per
forward, groups and padding any), that output is read by the BatchNorm alone (not also by a
residual add or a hook of ours), the BatchNorm is a ``BatchNorm2d`` with running statistics and
the channel counts match. Anything else is left as it is.

The copy keeps every module path of the original: a folded BatchNorm becomes an ``Identity``
at the same path, so a hook there still sees the normalised map, but a hook on the folded
*convolution* sees the normalised map too. Callers that read a layer's values therefore use
the copy only when no layer they read is in ``Folded.convolutions`` (``Folded.changes(path)``).
The original module is never touched, and a network with forward hooks on it (a user's, or a
global one) is not folded at all: the hooks see the calls and values they were written for. Copies are cached per module and weight version (a
parameter or buffer changed in place makes a new copy), weakly, so a model that is dropped
frees its copy.

Every plain ``nn.Linear`` of the copy becomes a ``FastLinear`` (``convscope.probes.fastlinear``:
oneDNN's kernel, 2-2.5x the BLAS here, outputs equal to float32 rounding), sharing the original's
weight and bias objects, so a network without BatchNorm (AlexNet, VGG16) gets a copy too, at the
cost of its convolutions' bytes only.

``fuse=True`` (classify's copy, which reads no layer) goes two steps further, on pairs measured by
the same trace:

* **Padding into the kernel.** An explicit ``ZeroPad2d`` read by one convolution alone (the
  TensorFlow "same" padding of EfficientNet-Lite's stride-2 layers, ``(0, 1)`` or ``(1, 2)`` per
  axis) costs a copy of the whole map. A convolution pads symmetrically only, so the kernel
  grows by the difference instead: padding ``(before, after)`` with ``after > before`` is the
  same as padding ``after`` on both sides with ``after - before`` rows of zero weights in front
  of the kernel (output ``i`` then starts reading at ``stride * i - before``, as it did, and the
  output size is unchanged). The extra taps multiply zeros, so every sum is the same. It pays
  where the extra taps are few (a depthwise 3x3 becomes 4x4: 7 more per output) and the copy is
  large; a dense stem convolution on 3 channels would add 21 taps per output to save copying a
  3-channel photo, so a pair folds only when each output gains at most ``MAX_EXTRA_TAPS``.
  Measured (batch 32, channels-last, 2 cores): the stage-2 depthwise layer of Lite0 from 14.6 ms
  (10.6 of them the pad) to 5.2 ms, the stem from 3.0 to 4.2 ms (hence the limit).
* **Activation into the convolution.** A ``ReLU`` or ``ReLU6`` whose input is one (folded)
  convolution's output, read by nothing before it, is applied inside that convolution
  (``FusedConv2d``): on CPU float32 as a oneDNN post-op in the same pass over the map, elsewhere
  as the convolution then the clamp. The map is not read and written a second time.

Both change what a hook on those paths would see (the pad's output is the unpadded map, the
convolution's is activated), so ``Folded.changes`` names them too; the fused copy is checked
against the original on the example before it is used, and not used when they differ.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from convscope.probes.fastlinear import FastLinear, fast_linear_paths
from convscope.probes.hooks import eval_mode
from convscope.probes.layout import memory_format_of


@dataclass(frozen=True)
class Folded:
    """An inference copy with BatchNorm merged into convolutions.

    Attributes:
        module: the copy (the original itself when nothing folds: no copy is made).
        convolutions: paths of the convolutions that now include their BatchNorm.
        batchnorms: paths of the BatchNorms that became ``Identity`` (same order).
        pads: ``(pad path, convolution path)`` of each padding now in the convolution's kernel
            (the pad became ``Identity``; ``fuse=True`` only).
        activations: ``(convolution path, activation path)`` of each activation now applied by
            the convolution (a ``FusedConv2d``; the activation became ``Identity``; ``fuse=True`` only).
        linears: paths of the fully connected layers that became ``FastLinear``s (oneDNN's kernel,
            the same weight objects; their outputs equal the original's to float32 rounding, so
            ``changes`` does not name them).
    """

    module: nn.Module
    convolutions: tuple[str, ...]
    batchnorms: tuple[str, ...]
    pads: tuple[tuple[str, str], ...] = ()
    activations: tuple[tuple[str, str], ...] = ()
    linears: tuple[str, ...] = ()

    def changes(self, path: str) -> bool:
        """Whether the output of the module at ``path`` can differ in the copy: a folded
        convolution's does (it is normalised already), and so may a container holding the
        convolution but not its BatchNorm (its output may be the convolution's); likewise a
        folded pad's (the unpadded map) and a convolution that applies its activation."""
        merged = (*zip(self.convolutions, self.batchnorms, strict=True), *self.pads, *self.activations)
        return any(path in _between(changed, absorber) for changed, absorber in merged)


def _ancestors(path: str) -> set[str]:
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} | {""}


def _between(changed: str, absorber: str) -> set[str]:
    """The paths whose output may be ``changed``'s (a convolution's raw output, a pad's): that
    module and its containers that do not also hold ``absorber`` (its BatchNorm, activation or,
    for a pad, the convolution)."""
    return _ancestors(changed) - _ancestors(absorber)


class _Uses(TorchFunctionMode):
    """Counts, per tensor, how many tensor-producing operations read it (by identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # keeps counted tensors alive, so ids are not reused

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) or (isinstance(result, (tuple, list)) and any(
                isinstance(r, torch.Tensor) for r in result)):
            for value in _tensors(args, kwargs or {}):
                self.reads[id(value)] = self.reads.get(id(value), 0) + 1
                self.alive.append(value)
        return result


def _tensors(args: Any, kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


MAX_EXTRA_TAPS = 16
"""At most this many more multiply-adds per output value when a pad folds into a kernel (see
the module doc: a depthwise 3x3 or 5x5 adds 7 or 11 and gains; the 3-channel stem adds 21 and loses)."""

_ACTIVATIONS: dict[type[nn.Module], tuple[str, tuple[float, ...]]] = {
    # oneDNN post-op name and its scalars, per activation class (exact types: a subclass may differ)
    nn.ReLU: ("relu", ()),
    nn.ReLU6: ("hardtanh", (0.0, 6.0)),
}


@dataclass
class _Trace:
    """What one traced forward saw: calls per path, candidate pairs, reads per tensor."""

    calls: dict[str, int]
    batchnorms: list[tuple[str, str, int]]  # (conv, bn, id of the conv's output)
    pads: list[tuple[str, str, int]]  # (pad, conv, id of the pad's output)
    activations: list[tuple[str, str, str, int, int]]  # (conv, bn or "", act, input id, reads by then)
    reads: dict[int, int]
    output: Any


def _trace(module: nn.Module, example: torch.Tensor) -> _Trace:
    """One forward of ``example`` with hooks on convolutions, BatchNorms, pads and activations."""
    names = {m: n for n, m in module.named_modules()}
    produced: dict[int, str] = {}  # output tensor id -> conv path
    normalised: dict[int, tuple[str, str]] = {}  # bn output id -> (conv, bn) read by that bn
    padded: dict[int, str] = {}  # pad output id -> pad path
    trace = _Trace({}, [], [], [], {}, None)
    keep: list[torch.Tensor] = []
    uses = _Uses()

    def after(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        path = names.get(mod)
        if path is None:
            return
        trace.calls[path] = trace.calls.get(path, 0) + 1
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if first is None or not isinstance(output, torch.Tensor):
            return
        keep.extend((first, output))
        if isinstance(mod, nn.Conv2d):
            produced[id(output)] = path
            if id(first) in padded:
                trace.pads.append((padded[id(first)], path, id(first)))
        elif isinstance(mod, nn.BatchNorm2d):
            source = produced.get(id(first))
            if source is not None:
                trace.batchnorms.append((source, path, id(first)))
                normalised[id(output)] = (source, path)
        elif isinstance(mod, nn.ConstantPad2d):
            padded[id(output)] = path
        elif type(mod) in _ACTIVATIONS:
            conv, bn = normalised.get(id(first), (produced.get(id(first)), ""))
            if conv is not None:
                # reads so far: an in-place activation's output is its input, read again later
                trace.activations.append((conv, bn, path, id(first), uses.reads.get(id(first), 0)))

    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.ConstantPad2d, *_ACTIVATIONS)
    handles = [m.register_forward_hook(after) for m in module.modules() if isinstance(m, kinds)]
    try:
        with eval_mode(module), torch.no_grad(), uses:
            trace.output = module(example)
    finally:
        for handle in handles:
            handle.remove()
    trace.reads = uses.reads
    return trace


def _batchnorm_pairs(module: nn.Module, trace: _Trace) -> list[tuple[str, str]]:
    pairs = []
    for conv_path, bn_path, tensor in trace.batchnorms:
        conv, bn = module.get_submodule(conv_path), module.get_submodule(bn_path)
        if (trace.calls.get(conv_path) == 1 and trace.calls.get(bn_path) == 1 and trace.reads.get(tensor) == 1
                and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
                and bn.num_features == conv.out_channels):
            pairs.append((conv_path, bn_path))
    return pairs


def foldable_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv path, batchnorm path)`` pairs that fold, from one traced forward of ``example``."""
    return _batchnorm_pairs(module, _trace(module, example))


def foldable_pairs_and_pads(module: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``foldable_pairs`` and the ``(pad path, conv path)`` pairs whose zero pad grows into the
    kernel (``grow_kernel``), from one traced forward of ``example``."""
    trace = _trace(module, example)
    return _batchnorm_pairs(module, trace), _pad_pairs(module, trace)


def _kernel_growth(pad: nn.ConstantPad2d, conv: nn.Conv2d) -> tuple[tuple[int, int], ...] | None:
    """Per axis (height, width): ``(before, after)`` total padding of ``pad`` then ``conv``, when
    the pair folds into one symmetric-padded convolution (module doc), else ``None``."""
    if (pad.value != 0 or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple)
            or conv.dilation != (1, 1)):
        return None
    left, right, top, bottom = pad.padding
    if min(left, right, top, bottom) < 0:
        return None
    axes = ((top + conv.padding[0], bottom + conv.padding[0]), (left + conv.padding[1], right + conv.padding[1]))
    grown = [k + abs(after - before) for k, (before, after) in zip(conv.kernel_size, axes, strict=True)]
    extra = conv.in_channels // conv.groups * (grown[0] * grown[1] - conv.kernel_size[0] * conv.kernel_size[1])
    return axes if extra <= MAX_EXTRA_TAPS else None


def _pad_pairs(module: nn.Module, trace: _Trace) -> list[tuple[str, str]]:
    pairs = []
    for pad_path, conv_path, tensor in trace.pads:
        pad, conv = module.get_submodule(pad_path), module.get_submodule(conv_path)
        if (trace.calls.get(pad_path) == 1 and trace.calls.get(conv_path) == 1 and trace.reads.get(tensor) == 1
                and isinstance(pad, nn.ConstantPad2d) and isinstance(conv, nn.Conv2d)
                and _kernel_growth(pad, conv) is not None):
            pairs.append((pad_path, conv_path))
    return pairs


def _activation_pairs(module: nn.Module, trace: _Trace, folded: set[str]) -> list[tuple[str, str]]:
    """``(conv, activation)``: the activation reads the convolution's output (through a BatchNorm
    that folds), and nothing read that map before it."""
    pairs = []
    for conv_path, bn_path, act_path, tensor, reads_then in trace.activations:
        if bn_path and bn_path not in folded:
            continue
        act = module.get_submodule(act_path)
        inplace = bool(getattr(act, "inplace", False))
        # in place: later reads see the activated map, which the fused convolution returns too
        unread = reads_then == 1 if inplace else trace.reads.get(tensor) == 1
        if (unread and trace.calls.get(conv_path) == 1 and trace.calls.get(act_path) == 1
                and isinstance(module.get_submodule(conv_path), nn.Conv2d)):
            pairs.append((conv_path, act_path))
    return pairs


def _merge(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` becomes ``bn(conv(x))`` (eval-mode statistics), in float64 then back."""
    assert bn.running_mean is not None and bn.running_var is not None
    weight = conv.weight.detach().double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    shift = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale + shift
    with torch.no_grad():
        conv.weight.copy_((weight * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(new_bias.to(conv.bias.dtype))


def set_module(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, name, new)


def _pointwise_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _two(values: tuple[int, ...]) -> tuple[int, int]:
    return values[0], values[1]


class FusedConv2d(nn.Conv2d):
    """A convolution that applies the ``ReLU``/``ReLU6`` after it in the same pass (``fuse=True``).

    On CPU float32 without autocast or autograd it runs oneDNN's convolution with the clamp as a
    post-op (``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile`` uses for
    this fusion); anywhere else it is the convolution, then the clamp. Either way the result is
    the pair's, which ``fold_batchnorm`` checks on the example before handing the copy out.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        assert isinstance(conv.padding, tuple)
        super().__init__(conv.in_channels, conv.out_channels, _two(conv.kernel_size), stride=_two(conv.stride),
                         padding=_two(conv.padding), dilation=_two(conv.dilation), groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self.attribute, scalars = _ACTIVATIONS[type(activation)]
        self.scalars = list(scalars)
        self.fast = _pointwise_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not (torch.is_grad_enabled() and x.requires_grad)):
            return torch.ops.mkldnn._convolution_pointwise(  # type: ignore[no-any-return]
                x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation),
                self.groups, self.attribute, self.scalars, "")
        out = super().forward(x)
        return F.relu(out) if self.attribute == "relu" else F.hardtanh(out, self.scalars[0], self.scalars[1])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused={self.attribute}{tuple(self.scalars) or ''}"


def grow_kernel(pad: nn.ConstantPad2d, conv: nn.Conv2d) -> None:
    """``conv`` becomes ``conv(pad(x))``: the kernel grows by zero rows and columns on the side
    with less padding, and the padding becomes symmetric (module doc)."""
    axes = _kernel_growth(pad, conv)
    assert axes is not None
    (top, bottom), (left, right) = axes
    height, width = conv.kernel_size
    grown = torch.zeros(conv.out_channels, conv.in_channels // conv.groups, height + abs(bottom - top),
                        width + abs(right - left), dtype=conv.weight.dtype, device=conv.weight.device)
    rows = slice(bottom - top, None) if bottom >= top else slice(0, height)
    columns = slice(right - left, None) if right >= left else slice(0, width)
    grown[:, :, rows, columns] = conv.weight.detach()
    conv.weight = nn.Parameter(grown.contiguous(memory_format=memory_format_of(conv.weight)), requires_grad=False)
    conv.kernel_size = tuple(grown.shape[2:])  # type: ignore[assignment]
    conv.padding = (max(top, bottom), max(left, right))


def grow_pads(twin: nn.Module, pads: list[tuple[str, str]]) -> None:
    """In the copy ``twin``: each ``(pad path, conv path)`` pad grown into its convolution's kernel
    (``grow_kernel``), the pad an ``Identity``."""
    for pad_path, conv_path in pads:
        pad, conv = twin.get_submodule(pad_path), twin.get_submodule(conv_path)
        assert isinstance(pad, nn.ConstantPad2d) and isinstance(conv, nn.Conv2d)
        grow_kernel(pad, conv)
        set_module(twin, pad_path, nn.Identity())


def hooked(module: nn.Module) -> bool:
    """Whether someone watches the network's calls (forward hooks on any of its modules, or global
    ones): then it runs as it is, so their hooks see every call and the values they expect."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def weight_version(module: nn.Module) -> tuple[int, ...]:
    """The version counters of every parameter and buffer: a change in place makes a new one."""
    return tuple(t._version for t in (*module.parameters(), *module.buffers()))


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[tuple[Any, ...], Folded]]] = weakref.WeakKeyDictionary()


def _build(module: nn.Module, batchnorms: list[tuple[str, str]], pads: list[tuple[str, str]],
           activations: list[tuple[str, str]]) -> Folded:
    linears = fast_linear_paths(module)
    if not (batchnorms or pads or activations or linears):
        return Folded(module, (), ())
    # The fully connected layers keep the original's weight and bias objects (no copy of a
    # classifier that can be most of the model's bytes, like VGG16's 470 MB).
    shared = {id(p): p for path in linears for p in module.get_submodule(path).parameters(recurse=False)}
    twin = copy.deepcopy(module, memo=dict(shared)).eval()
    for conv_path, bn_path in batchnorms:
        conv, bn = twin.get_submodule(conv_path), twin.get_submodule(bn_path)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        _merge(conv, bn)
        set_module(twin, bn_path, nn.Identity())
    grow_pads(twin, pads)
    for conv_path, act_path in activations:
        conv = twin.get_submodule(conv_path)
        assert isinstance(conv, nn.Conv2d)
        set_module(twin, conv_path, FusedConv2d(conv, twin.get_submodule(act_path)))
        set_module(twin, act_path, nn.Identity())
    for path in linears:
        linear = twin.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        set_module(twin, path, FastLinear(linear))
    for parameter in twin.parameters():
        if id(parameter) not in shared:  # the original's own stay as they are
            parameter.requires_grad_(False)
    return Folded(twin, tuple(c for c, _ in batchnorms), tuple(b for _, b in batchnorms), tuple(pads),
                  tuple(activations), tuple(linears))


def _agrees(folded: Folded, example: torch.Tensor, expected: Any) -> bool:
    """The copy's output on ``example`` within float32 rounding of the original's."""
    with torch.no_grad():
        got = folded.module(example)
    if not isinstance(got, torch.Tensor) or not isinstance(expected, torch.Tensor) or got.shape != expected.shape:
        return False
    if not expected.numel():
        return True
    scale = 1.0 + float(expected.abs().max())
    return float((got.float() - expected.float()).abs().max()) <= 1e-4 * scale


def fold_batchnorm(module: nn.Module, example: torch.Tensor, *, fuse: bool = False) -> Folded:
    """The inference copy of ``module`` with each foldable BatchNorm merged (see the module doc).

    Args:
        module: the network (left unchanged, whatever its mode).
        example: one input batch of the size the copy will see (only its first image is run).
        fuse: also fold explicit zero pads into the kernels and activations into the
            convolutions (module doc). Only for callers that read no layer of the copy: a pad's
            output and a convolution's change (``Folded.changes``), so does a convolution's
            input, and the copy's modules are ``FusedConv2d``s, not plain ones.
    """
    if hooked(module):
        return Folded(module, (), ())
    key = (tuple(example.shape[1:]), example.dtype, example.device, weight_version(module))
    entries = _CACHE.setdefault(module, {})
    cached = entries.get(fuse)
    if cached is not None and cached[0] == key:
        return cached[1]
    trace = _trace(module, example[:1])
    batchnorms = _batchnorm_pairs(module, trace)
    folded = None
    if fuse:
        fused = _build(module, batchnorms, _pad_pairs(module, trace),
                       _activation_pairs(module, trace, {bn for _, bn in batchnorms}))
        # a oneDNN post-op or grown kernel that disagreed would fail silently: check on the example
        if fused.module is module or _agrees(fused, example[:1], trace.output):
            folded = fused
    if folded is None:
        folded = _build(module, batchnorms, [], [])
    entries[fuse] = (key, folded)
    return folded
