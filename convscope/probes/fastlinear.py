"""Fully connected layers through oneDNN instead of the BLAS, in inference copies.

PyTorch's CPU ``nn.Linear`` is a BLAS ``addmm``; the wheels link Intel's MKL, which on this
project's AMD EPYC machine runs its AVX2 code path. oneDNN's inner-product kernel (the one
``torch.compile`` emits for a linear layer, ``torch.ops.mkldnn._linear_pointwise``) runs the same
product at its AVX-512 speed. Measured here (2 cores, float32, best of 7):

==================  =====  ========  ========
weight (out x in)   batch  addmm     oneDNN
==================  =====  ========  ========
4096 x 9216         256    113 ms    43 ms    (AlexNet's fc6)
4096 x 25088        64     108 ms    37 ms    (VGG16's fc6)
4096 x 4096         16     7.0 ms    2.9 ms
1000 x 1280         64     0.95 ms   0.46 ms  (EfficientNet-Lite0's classifier)
256 x 576           256    0.38 ms   0.21 ms  (the small nets' fc1)
==================  =====  ========  ========

Outputs differ from ``addmm`` by float32 rounding (a different summation order: under 1e-5
absolute on unit-scale activations).

``FastLinear`` is an ``nn.Linear`` (same weight and bias objects, same module path) whose forward
takes that kernel on CPU float32 when no gradient is wanted and no autocast is on; anywhere else
(CUDA, autograd, autocast, another dtype, a PyTorch without the op) it is ``F.linear``.
``convscope.probes.fold`` puts one in place of each plain ``nn.Linear`` of its inference copies,
so everything that runs the copy (classify, occlusion, Score-CAM, the Quantus protocol) gains it
and nothing that reads gradients or hooks the user's model is touched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN and its linear kernel (every x86/ARM CPU wheel does)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FastLinear(nn.Linear):
    """``linear`` (shared weight and bias) with oneDNN's kernel where it applies (module doc)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.fast = onednn_linear_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
                x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", onednn" if self.fast else super().extra_repr()


def fast_linear_paths(module: nn.Module) -> list[str]:
    """The paths of ``module``'s plain ``nn.Linear`` layers on CPU in float32 (exact type: a
    subclass may compute something else), or none where the kernel is missing."""
    if not onednn_linear_available():
        return []
    return [path for path, child in module.named_modules()
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32]
