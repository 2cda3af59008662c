"""From a split's stored pixels to the steps of an epoch: batch order, each rank's share, and the
per-batch conversion to network input with seeded augmentation (``BatchTransform``).

A split holds ``uint8`` pixels (``convscope.training.data``); conversion to the model's channels
and size, augmentation and normalisation happen per batch, so one copy of the data serves any
architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from convscope.distributed import shard_range
from convscope.errors import BadArgument, DataError
from convscope.preprocess import Preprocess
from convscope.training.wording import literal, option_error

AUGMENTATIONS = ("crop", "flip", "color", "erase")


def epoch_batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's global batches: a seeded permutation of ``range(count)`` cut into full batches.

    The permutation is one ``randperm`` draw from ``generator`` whatever the number of processes,
    so every rank of a distributed run (all seeded alike) gets the batches of a one-process run;
    the last partial batch is dropped, so every step has ``batch_size`` images (``count`` when the
    split is smaller than one batch).
    """
    batch = min(batch_size, count)
    order = torch.randperm(count, generator=generator)
    return [order[start : start + batch] for start in range(0, count - batch + 1, batch)]


def rank_share(batch: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The part of a global ``batch`` of indices that ``rank`` of ``size`` trains on.

    Contiguous slices in rank order, differing in length by at most one; together the ranks
    cover the batch exactly once (``convscope.distributed.shard_range``).
    """
    share = shard_range(len(batch), rank, size)
    return batch[share.start : share.stop]


def parse_augment(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"crop,flip"`` or ``["crop", "flip"]`` -> validated, de-duplicated names in canonical order."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    names = [s.strip().lower() for s in items if s.strip() and s.strip().lower() != "none"]
    for name in names:
        if name not in AUGMENTATIONS:
            from convscope.errors import close_matches

            raise option_error(BadArgument, f"{{augment}} {literal(name)}", "unknown augmentation",
                               literal(close_matches(name, AUGMENTATIONS)))
    return tuple(a for a in AUGMENTATIONS if a in names)


class BatchTransform:
    """uint8 pixels -> normalised network input, with optional seeded augmentation.

    Converts the channel count (grey <-> RGB), resizes to the model's input when the stored size
    differs, applies the augmentations, then normalises with the model's mean/std.

    Augmentations (each drawn per image from the ``generator``):
        crop: pad by 1/12 of the side (2 pixels for 28x28, 3 for 32x32) with black and take a
            random crop of the input size (random translation).
        flip: horizontal flip with probability 1/2.
        color: brightness and contrast x U(0.8, 1.2) (and saturation for RGB).
        erase: with probability 1/2, set a random rectangle (2-25 % of the area) to the mean
            (random erasing / cutout).
    """

    def __init__(self, preprocess: Preprocess, augment: Sequence[str] = ()) -> None:
        self.preprocess = preprocess
        self.augment = tuple(augment)
        self.size = preprocess.crop
        self.pad = max(1, round(self.size / 12))
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1.0 / 255.0) / std
        self._shift = mean / std

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 -> ``(B, channels, crop, crop)`` float32; no augmentation without a generator."""
        x = pixels
        channels = self.preprocess.channels
        augmenting = generator is not None and bool(self.augment)
        fits = x.shape[1] == channels and x.shape[-2] == self.size and x.shape[-1] == self.size
        if fits and not augmenting:
            # The fast path: one fused scale-and-shift (x / 255 - mean) / std.
            return torch.addcmul(-self._shift, x.float(), self._scale)
        x = x.float() / 255.0
        if x.shape[1] != channels:
            if channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif channels == 1 and x.shape[1] == 3:
                luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * luma).sum(dim=1, keepdim=True)
            else:
                raise DataError("data", f"images have {x.shape[1]} channels, the model takes {channels}")
        if x.shape[-2] != self.size or x.shape[-1] != self.size:
            shrinking = x.shape[-2] > self.size or x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrinking)
        if augmenting:
            assert generator is not None
            x = self._augment(x.contiguous(), generator)
        mean = torch.tensor(self.preprocess.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        if augmenting and "erase" in self.augment:
            assert generator is not None
            x = self._erase(x, generator)
        return x

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, channels, height, width = x.shape
        if "crop" in self.augment:
            pad = self.pad
            padded = F.pad(x, (pad, pad, pad, pad))
            wide = width + 2 * pad
            dy = torch.randint(0, 2 * pad + 1, (count,), generator=generator)
            dx = torch.randint(0, 2 * pad + 1, (count,), generator=generator)
            # One flat gather per image (3x faster than 4-D advanced indexing).
            rows = dy[:, None, None] + torch.arange(height)[None, :, None]
            cols = dx[:, None, None] + torch.arange(width)[None, None, :]
            index = (rows * wide + cols).view(count, 1, height * width).expand(count, channels, height * width)
            x = padded.view(count, channels, -1).gather(2, index).view(count, channels, height, width)
        if "flip" in self.augment:
            flip = torch.rand(count, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if "color" in self.augment:
            brightness = torch.empty(count, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
            contrast = torch.empty(count, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
            if channels == 3:
                saturation = torch.empty(count, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
                grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
                x = grey + (x - grey) * saturation
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean) * brightness
            x = x.clamp(0.0, 1.0)
        return x

    def _erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = x.shape
        area = torch.empty(count).uniform_(0.02, 0.25, generator=generator) * height * width
        aspect = torch.exp(torch.empty(count).uniform_(-1.2, 1.2, generator=generator))
        h = (area * aspect).sqrt().round().clamp(1, height).long()
        w = (area / aspect).sqrt().round().clamp(1, width).long()
        top = (torch.rand(count, generator=generator) * (height - h + 1)).long()
        left = (torch.rand(count, generator=generator) * (width - w + 1)).long()
        apply = torch.rand(count, generator=generator) < 0.5
        ys = torch.arange(height)[None, :]
        xs = torch.arange(width)[None, :]
        inside_y = (ys >= top[:, None]) & (ys < (top + h)[:, None])
        inside_x = (xs >= left[:, None]) & (xs < (left + w)[:, None])
        mask = (inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None])[:, None]
        return x.masked_fill(mask, 0.0)
