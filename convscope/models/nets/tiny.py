"""The ``tiny`` test network (registry row in ``convscope.models.tiny``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv(3->8, 3x3) ReLU maxpool, conv(8->16, 3x3) ReLU maxpool, linear; 32x32 RGB input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
