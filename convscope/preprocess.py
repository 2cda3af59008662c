"""Model input preprocessing: resize, centre-crop, normalise, and its inverse for display."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels.

    Attributes:
        resize: shorter side after resizing (``None``: no resize; the crop then scales).
        crop: side of the square centre crop, the network input size.
        mean, std: per-channel normalisation applied to ``[0, 1]`` pixels.
        channels: 3 for RGB models, 1 for grayscale ones (MNIST-like).
    """

    resize: int | None
    crop: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.crop, self.crop)

    def to_pil(self, image: Image.Image) -> Image.Image:
        """Resize and centre-crop a PIL image to the network's view of it (no normalisation)."""
        mode = "L" if self.channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        if self.resize is None:
            return image.resize((self.crop, self.crop), Image.Resampling.BILINEAR)
        w, h = image.size
        scale = self.resize / min(w, h)
        # Match torchvision's Resize(int): shorter side exactly `resize`, the other truncated.
        if w <= h:
            size = (self.resize, int(self.resize * h / w))
        else:
            size = (int(self.resize * w / h), self.resize)
        if scale != 1.0:
            image = image.resize(size, Image.Resampling.BILINEAR)
        w, h = image.size
        left = int(round((w - self.crop) / 2.0))
        top = int(round((h - self.crop) / 2.0))
        return image.crop((left, top, left + self.crop, top + self.crop))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # here, not at the top: model registry rows hold a Preprocess and import without torch

        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def to_tensor(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """Images -> normalised batch.

        Returns:
            ``(N, C, crop, crop)`` float32.
        """
        if isinstance(images, Image.Image):
            images = [images]
        arrays = []
        for image in images:
            array = np.asarray(self.to_pil(image), dtype=np.float32) / 255.0
            if array.ndim == 2:
                array = array[:, :, None]
            arrays.append(array.transpose(2, 0, 1))
        import torch

        batch = torch.from_numpy(np.stack(arrays))
        mean, std = self._stats(batch)
        return (batch - mean) / std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` pixels in ``[0, 1]`` -> normalised network input."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def to_display(self, batch: torch.Tensor) -> torch.Tensor:
        """Invert the normalisation.

        Returns:
            ``(N, C, H, W)`` float in ``[0, 1]`` (clamped), on the input's device.
        """
        mean, std = self._stats(batch)
        return (batch * std + mean).clamp(0.0, 1.0)


IMAGENET = Preprocess(resize=256, crop=224)
