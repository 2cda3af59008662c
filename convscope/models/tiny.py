"""``tiny``: a small seeded CNN registered like any other model, for tests and smoke runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from convscope.models.registry import ModelSpec, register_model
from convscope.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn


def _build(num_classes: int) -> nn.Module:
    from convscope.models.nets.tiny import TinyNet

    return TinyNet(num_classes)


register_model(
    ModelSpec(
        name="tiny",
        build=_build,
        preprocess=Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        labels="cifar10",
        description="two-conv test network (32x32 RGB); random weights only",
        stages={"conv1": "features.1", "conv2": "features.4"},
        cam_layer="features.4",
        first_conv="features.0",
        channels_last=True,  # 2.63x forward on CPU (bench/cpu_fast_path.py layouts, 2026-12-08)
    )
)


def __getattr__(name: str) -> object:
    # The network classes live in ``convscope.models.nets.tiny`` (they need torch); reachable here as before.
    import importlib

    return getattr(importlib.import_module("convscope.models.nets.tiny"), name)
