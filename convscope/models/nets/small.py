"""Small AlexNet/ZFNet-style networks (registry rows and design notes in ``convscope.models.small``)."""

from __future__ import annotations

import torch
from torch import nn

from convscope.models.small import WIDTHS


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
