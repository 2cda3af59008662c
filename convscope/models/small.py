"""Small AlexNet/ZFNet variants for 28x28 grayscale (Fashion-MNIST) and 32x32 RGB (CIFAR-like) data.

Same five-conv shape as the ImageNet nets, scaled down to train in minutes on a CPU.
BatchNorm after each convolution replaces the originals' local response normalisation
(it trains much faster and the deconvnet/guided rules pass through it unchanged).
The AlexNet variants use a coarse first layer (5x5 stride 2); the ZFNet variants apply
Zeiler & Fergus' fix (3x3 stride 1, then pooling), keeping more spatial detail early on.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from convscope.models.registry import ModelSpec, register_model
from convscope.preprocess import Preprocess

FASHION_MNIST_PREPROCESS = Preprocess(
    resize=None, crop=28, mean=(0.2860,), std=(0.3530,), channels=1
)
CIFAR_PREPROCESS = Preprocess(
    resize=None, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)

WIDTHS = (32, 64, 96, 96, 64)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallConvNet(nn.Module):
    """Five conv layers (conv-BN-ReLU), three max-pools, two FC layers.

    Args:
        in_channels: 1 (grayscale) or 3 (RGB).
        num_classes: output classes.
        style: ``"alexnet"`` (conv1 5x5 stride 2, no pool after it) or ``"zfnet"``
            (conv1 3x3 stride 1 followed by 2x2 max-pool).
        widths: channels of conv1..conv5.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        style: str = "zfnet",
        widths: tuple[int, int, int, int, int] = WIDTHS,
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        if style == "alexnet":
            first: list[nn.Module] = _conv_bn_relu(in_channels, c1, 5, stride=2)
            second = [*_conv_bn_relu(c1, c2, 5), nn.MaxPool2d(2)]
        elif style == "zfnet":
            first = [*_conv_bn_relu(in_channels, c1, 3), nn.MaxPool2d(2)]
            second = [*_conv_bn_relu(c1, c2, 3), nn.MaxPool2d(2)]
        else:
            raise ValueError(f"style must be 'alexnet' or 'zfnet', not {style!r}")
        self.features = nn.Sequential(
            *first,
            *second,
            *_conv_bn_relu(c2, c3, 3),
            *_conv_bn_relu(c3, c4, 3),
            *_conv_bn_relu(c4, c5, 3),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * 9, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def _stages(style: str) -> dict[str, str]:
    # Module paths of each conv's ReLU in SmallConvNet.features.
    relus = [2, 5, 9, 12, 15] if style == "alexnet" else [2, 6, 10, 13, 16]
    return {f"conv{i + 1}": f"features.{r}" for i, r in enumerate(relus)}


def _build(num_classes: int, *, style: str, channels: int) -> nn.Module:
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
            )
        )
