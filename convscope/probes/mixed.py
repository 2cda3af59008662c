"""The bfloat16 plan of an inference copy: some convolutions in bfloat16, the sensitive ones in float32.

Under ``--precision bf16`` (CPU autocast) every convolution computes in bfloat16 and every map
between them is rounded to 8 bits of mantissa. Score-CAM weighs channels by the softmax of the
masked copies' scores, so that rounding moves its maps. Measured on EfficientNet-Lite0 and a real
photo (skimage's chelsea), as the correlation of the map with float32's at stage2 / stage5 /
stage6 / head, with the clean pass in float32 and the masked copies under autocast:

- every convolution in bfloat16: 0.9987 / 0.9986 at stage2 / stage5;
- depthwise (grouped) convolutions in float32: 0.9995 / 0.9996 / **0.9981** / 0.9995;
- those and the layers at stride 8 or less from the input (Lite0's ``features.0``-``features.3``)
  in float32: 0.9993 / 0.9996 / 0.9991 / 0.9999, and still 10-15% faster than all float32 on this
  AVX-512-BF16 CPU (same run).

Both kinds are where bfloat16 gains least: depthwise convolutions do a few multiply-adds per value
loaded (memory-bound), and the high-resolution layers of a mobile network are a small share of its
multiply-adds; the dense 1x1 convolutions at low resolution, where AMX pays, stay in bfloat16. So the
plan keeps in float32 every grouped convolution and every convolution whose output has at least
1/64 of the input's pixels.
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


HIGH_RESOLUTION = 64
"""A convolution whose output has at least 1/``HIGH_RESOLUTION`` of the input's pixels (stride 8 or
less from the input) stays float32 (module doc)."""

_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def float32_paths(module: nn.Module, example: torch.Tensor) -> list[str]:
    """The convolutions the plan keeps in float32, from one forward of ``example`` (module doc)."""
    area = example.shape[-1] * example.shape[-2]
    outputs: dict[str, int] = {}
    names = {m: n for n, m in module.named_modules()}

    def record(conv: nn.Module, _: object, output: torch.Tensor) -> None:
        outputs[names[conv]] = int(output.shape[-1] * output.shape[-2])

    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(record) for m in convs]
    try:
        with torch.no_grad(), torch.autocast(example.device.type, enabled=False):
            module(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return [names[m] for m in convs if names[m] in outputs
            and (m.groups > 1 or outputs[names[m]] * HIGH_RESOLUTION >= area)]


def bf16_plan(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``module`` (an inference copy: no hooks of anyone's, no gradients) whose grouped and
    high-resolution convolutions run in float32 under autocast (module doc); ``module`` itself when
    there are none. Cached per module and input size, weakly: ``module`` is an inference copy
    (``probes.fold``), itself remade when the original's weights change."""
    key = tuple(example.shape[1:])
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    paths = float32_paths(module, example)
    twin = module
    if paths:
        twin = copy.deepcopy(module)
        for path in paths:
            set_module(twin, path, Float32(twin.get_submodule(path)))
    _CACHE[module] = (key, twin)
    return twin
