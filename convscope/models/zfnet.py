"""ZFNet (Zeiler & Fergus 2014, Fig. 3): AlexNet with the 7x7 stride-2 first layer fix.

conv1 96x7x7 stride 2 -> 3x3 max-pool stride 2 -> contrast norm; conv2 256x5x5 stride 2 ->
pool -> norm; conv3 384, conv4 384, conv5 256 (3x3) -> pool; two 4096 FC layers; 1000 classes.
For a 224 input the maps are 110, 55, 26, 13, 13, 13, 6 pixels wide, as in the paper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from convscope.models.registry import ModelSpec, register_model
from convscope.preprocess import IMAGENET

if TYPE_CHECKING:
    from torch import nn


def _build(num_classes: int) -> nn.Module:
    from convscope.models.nets.zfnet import ZFNet

    return ZFNet(num_classes=num_classes)


register_model(
    ModelSpec(
        name="zfnet",
        build=_build,
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
        channels_last=True,  # 1.51x forward on CPU (bench/cpu_fast_path.py layouts, 2026-12-08)
    )
)


def __getattr__(name: str) -> object:
    # The network classes live in ``convscope.models.nets.zfnet`` (they need torch); reachable here as before.
    import importlib

    return getattr(importlib.import_module("convscope.models.nets.zfnet"), name)
