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
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from convscope.probes.hooks import eval_mode


@dataclass(frozen=True)
class Folded:
    """An inference copy with BatchNorm merged into convolutions.

    Attributes:
        module: the copy (the original itself when nothing folds: no copy is made).
        convolutions: paths of the convolutions that now include their BatchNorm.
        batchnorms: paths of the BatchNorms that became ``Identity`` (same order).
    """

    module: nn.Module
    convolutions: tuple[str, ...]
    batchnorms: tuple[str, ...]

    def changes(self, path: str) -> bool:
        """Whether the output of the module at ``path`` can differ in the copy: a folded
        convolution's does (it is normalised already), and so may a container holding the
        convolution but not its BatchNorm (its output may be the convolution's)."""
        return any(path in _between(conv, bn) for conv, bn in zip(self.convolutions, self.batchnorms, strict=True))


def _ancestors(path: str) -> set[str]:
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} | {""}


def _between(conv: str, bn: str) -> set[str]:
    """The paths whose output may be ``conv``'s raw output: ``conv`` and its containers that do
    not also hold ``bn``."""
    return _ancestors(conv) - _ancestors(bn)


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


def foldable_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv path, batchnorm path)`` pairs that fold, from one traced forward of ``example``."""
    names = {m: n for n, m in module.named_modules()}
    produced: dict[int, str] = {}  # output tensor id -> conv path
    calls: dict[str, int] = {}
    candidates: list[tuple[str, str, int]] = []
    keep: list[torch.Tensor] = []

    def after(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        path = names.get(mod)
        if path is None:
            return
        calls[path] = calls.get(path, 0) + 1
        if isinstance(mod, nn.Conv2d) and isinstance(output, torch.Tensor):
            produced[id(output)] = path
            keep.append(output)
        elif isinstance(mod, nn.BatchNorm2d) and inputs and isinstance(inputs[0], torch.Tensor):
            source = produced.get(id(inputs[0]))
            if source is not None:
                candidates.append((source, path, id(inputs[0])))

    handles = [m.register_forward_hook(after) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    uses = _Uses()
    try:
        with eval_mode(module), torch.no_grad(), uses:
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for conv_path, bn_path, tensor in candidates:
        conv, bn = module.get_submodule(conv_path), module.get_submodule(bn_path)
        if (calls.get(conv_path) == 1 and calls.get(bn_path) == 1 and uses.reads.get(tensor) == 1
                and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
                and bn.num_features == conv.out_channels):
            pairs.append((conv_path, bn_path))
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


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, name, new)


def _hooked(module: nn.Module) -> bool:
    """Whether someone watches the network's calls (forward hooks on any of its modules, or global
    ones): then it runs as it is, so their hooks see every call and the values they expect."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _version(module: nn.Module) -> tuple[int, ...]:
    return tuple(t._version for t in (*module.parameters(), *module.buffers()))


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Folded]] = weakref.WeakKeyDictionary()


def fold_batchnorm(module: nn.Module, example: torch.Tensor) -> Folded:
    """The inference copy of ``module`` with each foldable BatchNorm merged (see the module doc).

    Args:
        module: the network (left unchanged, whatever its mode).
        example: one input batch of the size the copy will see (only its first image is run).
    """
    if _hooked(module):
        return Folded(module, (), ())
    key = (tuple(example.shape[1:]), example.dtype, example.device, _version(module))
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    pairs = foldable_pairs(module, example[:1])
    if not pairs:
        folded = Folded(module, (), ())
    else:
        twin = copy.deepcopy(module).eval()
        for conv_path, bn_path in pairs:
            conv = twin.get_submodule(conv_path)
            bn = twin.get_submodule(bn_path)
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            _merge(conv, bn)
            _set(twin, bn_path, nn.Identity())
        for parameter in twin.parameters():
            parameter.requires_grad_(False)
        folded = Folded(twin, tuple(c for c, _ in pairs), tuple(b for _, b in pairs))
    _CACHE[module] = (key, folded)
    return folded
