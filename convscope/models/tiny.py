"""``tiny``: a small seeded CNN registered like any other model, for tests and smoke runs."""

from __future__ import annotations

import torch
from torch import nn

from convscope.models.registry import ModelSpec, register_model
from convscope.preprocess import Preprocess


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


register_model(
    ModelSpec(
        name="tiny",
        build=lambda num_classes: TinyNet(num_classes),
        preprocess=Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        labels="cifar10",
        description="two-conv test network (32x32 RGB); random weights only",
        stages={"conv1": "features.1", "conv2": "features.4"},
        cam_layer="features.4",
        first_conv="features.0",
    )
)
