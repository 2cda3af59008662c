"""A copy of a model for input gradients, with each BatchNorm's backward merged into its convolution.

Methods that need the gradient of a score with respect to the *input* only (saliency, Integrated
Gradients, SmoothGrad) pay, per convolution followed by an eval-mode BatchNorm, for two backward
passes over the map: the BatchNorm's (a per-channel scale) and the convolution's. Folding the
BatchNorm into the convolution for the forward too (``convscope.probes.fold``) would be faster
still, but it moves every pre-activation by rounding, and a ReLU6 gate sitting at 0 or 6 moves
with it: the gradients then differ from the unfolded network's by up to 4.5e-3 (relative), far
from the 1e-5 the peers are held to.

This copy keeps the forward exact and changes only the backward. At each foldable pair (the
same pairs as ``fold.foldable_pairs``: a ``BatchNorm2d`` with running statistics that alone reads
one ``Conv2d``'s output) the convolution becomes ``_InputGradConvBN``: its forward is the
convolution then the BatchNorm, the same operations on the same values, and its backward is one
transposed convolution with the weight scaled per output channel by ``gamma / sqrt(var + eps)``:
the chain rule of the two, in one pass. Nothing is saved for the backward but that weight (the
convolution's input is not needed for an input gradient), so the graph holds less memory too.
The gradients differ from the original network's by rounding only (the scale is applied to the
weight instead of the map), and no parameter gets a gradient.

An explicit zero pad read by one convolution alone (EfficientNet-Lite's TensorFlow "same" pads
before its stride-2 depthwise layers) grows into that convolution's kernel, as in classify's fused
copy (``fold.grow_kernel``): the extra taps multiply zeros, so the forward is bit for bit the same
(checked on Lite0's four), and the pad's copy of the map and its backward copy go away (on Lite0,
50 points, 2 cores: about 10% of an Integrated Gradients call).

The BatchNorm's path holds an ``Identity`` in the copy, and the convolution's path holds the pair,
so a hook on either would see other values than in the original: like ``fold_batchnorm``, a
network with forward hooks is not rewritten, and callers that hook a layer use the original.
Copies are cached per module, input shape and weight version, weakly.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.grad import conv2d_input

from convscope.probes.fold import foldable_pairs_and_pads, grow_pads, hooked, set_module, weight_version
from convscope.probes.layout import memory_format_of


class _ConvBNFunction(torch.autograd.Function):
    """``bn(conv(x))`` forward; backward to ``x`` only, through the BatchNorm-scaled weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, unit: _InputGradConvBN) -> torch.Tensor:  # type: ignore[override]
        ctx.unit = unit
        ctx.shape = x.shape
        return unit.bn(unit.conv(x))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        unit: _InputGradConvBN = ctx.unit
        conv = unit.conv
        weight = unit.scaled_weight(grad.dtype)
        grad_input = conv2d_input(ctx.shape, weight, grad, conv.stride, conv.padding,  # type: ignore[arg-type]
                                                conv.dilation, conv.groups)
        return grad_input, None


class _InputGradConvBN(nn.Module):
    """A convolution and the BatchNorm that follows it (see the module doc)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self._scaled: dict[torch.dtype, torch.Tensor] = {}

    def scaled_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The convolution's weight times the BatchNorm's per-channel scale (computed once)."""
        if dtype not in self._scaled:
            bn = self.bn
            assert bn.running_var is not None
            scale = bn.running_var.double().add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.detach().double()
            weight = self.conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
            self._scaled[dtype] = weight.to(dtype).contiguous(memory_format=memory_format_of(self.conv.weight))
        return self._scaled[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.bn(self.conv(x))
        return _ConvBNFunction.apply(x, self)  # type: ignore[no-any-return]


def _mergeable(conv: nn.Module) -> bool:
    """Convolutions whose input gradient ``convolution_backward`` gives as they compute: numeric
    padding with zeros (``padding="same"`` strings and other padding modes are left alone)."""
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and type(conv).forward is nn.Conv2d.forward)


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], nn.Module]] = weakref.WeakKeyDictionary()


def input_gradient_copy(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """The copy of ``module`` for input gradients (``module`` itself when nothing merges or it
    is hooked); eval mode, no parameter requires a gradient.

    Args:
        module: the network (left unchanged).
        example: an input batch of the size the copy will see (only its first image is run).
    """
    if hooked(module) or not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        return module  # watched, or nothing to merge: no trace, no copy
    key = (tuple(example.shape[1:]), example.dtype, example.device, weight_version(module))
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    found, pads = foldable_pairs_and_pads(module, example[:1])
    pairs = [(c, b) for c, b in found if _mergeable(module.get_submodule(c))]
    twin = module
    if pairs:
        twin = copy.deepcopy(module).eval()
        grow_pads(twin, pads)  # the explicit "same" pads first: the kernels grow
        for conv_path, bn_path in pairs:
            conv, bn = twin.get_submodule(conv_path), twin.get_submodule(bn_path)
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            set_module(twin, conv_path, _InputGradConvBN(conv, bn))
            set_module(twin, bn_path, nn.Identity())
        for parameter in twin.parameters():
            parameter.requires_grad_(False)
    _CACHE[module] = (key, twin)
    return twin
