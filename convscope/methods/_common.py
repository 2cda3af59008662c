"""Input handling shared by the methods (no PIL import here: images are converted by the preset)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convscope.models.load import as_loaded
from convscope.types import LoadedModel
from convscope.validate import check_target, image_batch

ModelLike = LoadedModel | nn.Module


def prepare(
    model: ModelLike, images: Any, *, target: Any = None, whole_network: bool = True
) -> tuple[LoadedModel, torch.Tensor]:
    """Check a method's arguments up front and return the ``LoadedModel`` and the batch.

    Accepts a model or module and PIL image(s) or a normalised ``(N, C, H, W)`` / ``(C, H, W)``
    float tensor (see ``convscope.validate`` for what is refused and why), and the method's
    ``target`` when it has one. ``whole_network=False`` is for methods that run only part of
    the network (deconv stops at its layer): the input then need not fit the classifier.

    Returns:
        the ``LoadedModel`` and an ``(N, C, H, W)`` batch on the model's device and dtype.

    Raises:
        BadInputType, BadInput: see ``convscope.validate.image_batch`` and ``check_target``.
    """
    loaded = as_loaded(model)
    check_target(target)
    return loaded, image_batch(loaded, images, whole_network=whole_network)


def chunks(batch: torch.Tensor, size: int) -> list[torch.Tensor]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return list(torch.split(batch, size))
