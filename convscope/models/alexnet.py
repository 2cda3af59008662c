"""AlexNet in torchvision's layout, so torchvision's ImageNet weights load unchanged."""

from __future__ import annotations

from convscope.models.registry import ModelSpec, TorchvisionWeights, register_model, torchvision_builder
from convscope.preprocess import IMAGENET

register_model(
    ModelSpec(
        name="alexnet",
        build=lambda num_classes: torchvision_builder("alexnet")(weights=None, num_classes=num_classes),
        preprocess=IMAGENET,
        labels="imagenet",
        description="AlexNet (Krizhevsky et al. 2012), torchvision layout; 224x224 RGB",
        stages={
            "conv1": "features.1",
            "conv2": "features.4",
            "conv3": "features.7",
            "conv4": "features.9",
            "conv5": "features.11",
        },
        cam_layer="features.11",
        first_conv="features.0",
        pretrained=TorchvisionWeights("AlexNet_Weights.IMAGENET1K_V1"),
        channels_last=True,  # 1.38x forward on CPU (bench/cpu_fast_path.py layouts)
    )
)
