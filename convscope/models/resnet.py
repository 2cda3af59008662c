"""ResNet-18 and ResNet-50 (torchvision layout)."""

from __future__ import annotations

from convscope.models.registry import ModelSpec, TorchvisionWeights, register_model, torchvision_builder
from convscope.preprocess import IMAGENET

_STAGES = {
    "stem": "maxpool",
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
}

register_model(
    ModelSpec(
        name="resnet18",
        build=lambda num_classes: torchvision_builder("resnet18")(weights=None, num_classes=num_classes),
        preprocess=IMAGENET,
        labels="imagenet",
        description="ResNet-18 (He et al. 2015), torchvision layout; 224x224 RGB",
        stages=dict(_STAGES),
        cam_layer="layer4",
        first_conv="conv1",
        pretrained=TorchvisionWeights("ResNet18_Weights.IMAGENET1K_V1"),
        channels_last=True,  # 1.37x forward on CPU (bench/cpu_fast_path.py layouts, 2026-12-08)
    )
)

register_model(
    ModelSpec(
        name="resnet50",
        build=lambda num_classes: torchvision_builder("resnet50")(weights=None, num_classes=num_classes),
        preprocess=IMAGENET,
        labels="imagenet",
        description="ResNet-50 (He et al. 2015), torchvision layout; 224x224 RGB",
        stages=dict(_STAGES),
        cam_layer="layer4",
        first_conv="conv1",
        pretrained=TorchvisionWeights("ResNet50_Weights.IMAGENET1K_V1"),
        channels_last=True,  # 1.29x forward on CPU (bench/cpu_fast_path.py layouts, 2026-12-08)
    )
)
