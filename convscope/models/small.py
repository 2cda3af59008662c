"""Small AlexNet/ZFNet variants for 28x28 grayscale (Fashion-MNIST) and 32x32 RGB (CIFAR-like) data.

Same five-conv shape as the ImageNet nets, scaled down to train in minutes on a CPU.
BatchNorm after each convolution replaces the originals' local response normalisation
(it trains much faster and the deconvnet/guided rules pass through it unchanged).
The AlexNet variants use a coarse first layer (5x5 stride 2); the ZFNet variants apply
Zeiler & Fergus' fix (3x3 stride 1, then pooling), keeping more spatial detail early on.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from convscope.models.registry import ModelSpec, register_model
from convscope.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

FASHION_MNIST_PREPROCESS = Preprocess(
    resize=None, crop=28, mean=(0.2860,), std=(0.3530,), channels=1
)
CIFAR_PREPROCESS = Preprocess(
    resize=None, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)

WIDTHS = (32, 64, 96, 96, 64)


def _stages(style: str) -> dict[str, str]:
    # Module paths of each conv's ReLU in SmallConvNet.features.
    relus = [2, 5, 9, 12, 15] if style == "alexnet" else [2, 6, 10, 13, 16]
    return {f"conv{i + 1}": f"features.{r}" for i, r in enumerate(relus)}


def _build(num_classes: int, *, style: str, channels: int) -> nn.Module:
    from convscope.models.nets.small import SmallConvNet

    return SmallConvNet(channels, num_classes, style=style)


for _style in ("alexnet", "zfnet"):
    for _suffix, _channels, _pre, _labels, _what in (
        ("mnist", 1, FASHION_MNIST_PREPROCESS, "fashion_mnist", "28x28 grayscale (Fashion-MNIST)"),
        ("cifar", 3, CIFAR_PREPROCESS, "cifar10", "32x32 RGB (CIFAR-like)"),
    ):
        _st = _stages(_style)
        register_model(
            ModelSpec(
                name=f"{_style}_{_suffix}",
                build=partial(_build, style=_style, channels=_channels),
                preprocess=_pre,
                labels=_labels,
                description=f"small {'AlexNet' if _style == 'alexnet' else 'ZFNet'}-style net for {_what}",
                stages=_st,
                cam_layer=_st["conv5"],
                first_conv="features.0",
                channels_last=True,  # 1.40-2.15x forward on CPU, max-pooling 10-20x (bench/cpu_fast_path.py layouts, 2026-12-08)
            )
        )


def __getattr__(name: str) -> object:
    # The network classes live in ``convscope.models.nets.small`` (they need torch); reachable here as before.
    import importlib

    return getattr(importlib.import_module("convscope.models.nets.small"), name)
