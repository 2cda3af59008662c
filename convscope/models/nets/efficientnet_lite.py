"""EfficientNet-Lite networks (see ``convscope.models.efficientnet_lite`` for the registry rows,
the TensorFlow conventions kept here and the checkpoint adapter)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from convscope.models.efficientnet_lite import (
    _BASE_STAGES,
    BN_EPS,
    BN_MOMENTUM,
    HEAD_CHANNELS,
    STEM_CHANNELS,
)


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
    ``act`` (a fresh in-place ``nn.ReLU6``, as torchvision's MobileNetV2 has it: it overwrites
    ``bn``'s output, which nothing else reads, and saves 7 % of a batch-32 CPU forward pass;
    absent when ``activation=False``).
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
            layers["act"] = nn.ReLU6(inplace=True)
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
            if self.training and self.drop_path_rate > 0:
                # Imported here: torchvision.ops pulls in torch._dynamo (seconds) and only training needs it.
                from torchvision.ops import stochastic_depth

                out = stochastic_depth(out, self.drop_path_rate, "row", self.training)
            out = out + x
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
