"""The ZFNet network (registry row and the paper's layout in ``convscope.models.zfnet``)."""

from __future__ import annotations

import torch
from torch import nn


class ZFNet(nn.Module):
    """ZFNet with torchvision-AlexNet-style module paths (``features``, ``avgpool``, ``classifier``)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),  # 0
            nn.ReLU(inplace=True),  # 1
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # 2
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0),  # 3
            nn.Conv2d(96, 256, kernel_size=5, stride=2),  # 4
            nn.ReLU(inplace=True),  # 5
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # 6
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0),  # 7
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # 8
            nn.ReLU(inplace=True),  # 9
            nn.Conv2d(384, 384, kernel_size=3, padding=1),  # 10
            nn.ReLU(inplace=True),  # 11
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 12
            nn.ReLU(inplace=True),  # 13
            nn.MaxPool2d(kernel_size=3, stride=2),  # 14
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))
