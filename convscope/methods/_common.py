"""Input handling shared by the methods (no PIL import here: images are converted by the preset)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convscope.models.load import as_loaded
from convscope.types import LoadedModel

ModelLike = LoadedModel | nn.Module


def prepare(model: ModelLike, images: Any) -> tuple[LoadedModel, torch.Tensor]:
    """Accept a model or module and PIL image(s) or a normalised ``(N, C, H, W)`` / ``(C, H, W)``
    tensor; return the ``LoadedModel`` and the batch on the model's device and dtype."""
    loaded = as_loaded(model)
    if isinstance(images, torch.Tensor):
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        if batch.dim() != 4:
            raise ValueError(f"expected a (N, C, H, W) or (C, H, W) tensor, got shape {tuple(images.shape)}")
    else:
        if not isinstance(images, Sequence):
            images = [images]
        batch = loaded.preprocess.to_tensor(images)
    return loaded, batch.to(device=loaded.device, dtype=loaded.dtype)


def chunks(batch: torch.Tensor, size: int) -> list[torch.Tensor]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return list(torch.split(batch, size))
