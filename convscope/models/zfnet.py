"""ZFNet (Zeiler & Fergus 2014, Fig. 3): AlexNet with the 7x7 stride-2 first layer fix.

conv1 96x7x7 stride 2 -> 3x3 max-pool stride 2 -> contrast norm; conv2 256x5x5 stride 2 ->
pool -> norm; conv3 384, conv4 384, conv5 256 (3x3) -> pool; two 4096 FC layers; 1000 classes.
For a 224 input the maps are 110, 55, 26, 13, 13, 13, 6 pixels wide, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from convscope.models.registry import ModelSpec, register_model
from convscope.preprocess import IMAGENET


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


register_model(
    ModelSpec(
        name="zfnet",
        build=lambda num_classes: ZFNet(num_classes=num_classes),
        preprocess=IMAGENET,
        labels="imagenet",
        description="ZFNet (Zeiler & Fergus 2014): 7x7/2 conv1, 5x5/2 conv2; 224x224 RGB",
        stages={
            "conv1": "features.1",
            "conv2": "features.5",
            "conv3": "features.9",
            "conv4": "features.11",
            "conv5": "features.13",
        },
        cam_layer="features.13",
        first_conv="features.0",
    )
)
