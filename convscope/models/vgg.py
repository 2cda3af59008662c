"""VGG16 (torchvision layout)."""

from __future__ import annotations

from convscope.models.registry import ModelSpec, TorchvisionWeights, register_model, torchvision_builder
from convscope.preprocess import IMAGENET

register_model(
    ModelSpec(
        name="vgg16",
        build=lambda num_classes: torchvision_builder("vgg16")(weights=None, num_classes=num_classes),
        preprocess=IMAGENET,
        labels="imagenet",
        description="VGG16 (Simonyan & Zisserman 2014), torchvision layout; 224x224 RGB",
        # The ReLU after the last convolution of each block.
        stages={
            "block1": "features.3",
            "block2": "features.8",
            "block3": "features.15",
            "block4": "features.22",
            "block5": "features.29",
        },
        cam_layer="features.29",
        first_conv="features.0",
        pretrained=TorchvisionWeights("VGG16_Weights.IMAGENET1K_V1"),
        channels_last=True,  # 1.26x forward on CPU (bench/cpu_fast_path.py layouts, 2026-12-08)
    )
)
