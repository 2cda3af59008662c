"""The bfloat16 plan of an inference copy: dense convolutions in bfloat16, grouped ones in float32.

Under ``--precision bf16`` (CPU autocast) every convolution computes in bfloat16 and every map
between them is rounded to 8 bits of mantissa. Score-CAM weighs channels by the softmax of the
masked copies' scores, so that rounding moves its maps: on EfficientNet-Lite0 and a real photo the
map's correlation with float32's was 0.9986-0.9987 (stage2, stage5) with the clean pass in float32
and every masked copy in bfloat16. Measured per kind of layer kept in float32 (same photo, same
layers): depthwise (grouped) convolutions 0.9995-0.9996, pointwise 0.9990-0.9995, the stem and
head 0.9981-0.9989. Depthwise convolutions are also the layers bfloat16 does not speed up: they
do a few multiply-adds per value loaded (memory-bound), while the dense and pointwise ones are
where AMX pays. So the plan keeps grouped convolutions in float32 and leaves the rest to autocast.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from convscope.probes.fold import set_module


class Float32(nn.Module):
    """``module`` run in float32 with autocast off, whatever the input's dtype."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())  # type: ignore[no-any-return]


_CACHE: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def bf16_plan(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (an inference copy: no hooks, no gradients) whose grouped convolutions
    run in float32 under autocast (see the module doc); ``module`` itself when it has none.
    Cached per module, weakly: ``module`` is an inference copy (``probes.fold``), itself remade
    when the original's weights change, so a changed model never meets an old plan."""
    grouped = [path for path, child in module.named_modules() if isinstance(child, nn.Conv2d) and child.groups > 1]
    if not grouped:
        return module
    cached = _CACHE.get(module)
    if cached is not None:
        return cached
    twin = copy.deepcopy(module)
    for path in grouped:
        set_module(twin, path, Float32(twin.get_submodule(path)))
    _CACHE[module] = twin
    return twin
