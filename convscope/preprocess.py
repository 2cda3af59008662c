"""Model input preprocessing: resize, centre-crop, normalise, and its inverse for display."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from convscope.errors import BadInput, BadInputType
from convscope.imageio import SOURCE_INFO, ReducedSource
from convscope.imageio import load_image as _load_image

if TYPE_CHECKING:
    import torch

# Reduced decoding keeps the shorter side at least this many times the resize target, so the
# final bilinear resize still shrinks by 3x or more and its anti-aliasing filter still spans
# several source pixels (Pillow calls a gap of 3 "fair resampling in most cases").
REDUCING_GAP = 3


_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
INTERPOLATIONS = tuple(_FILTERS)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels.

    Attributes:
        resize: shorter side after resizing (``None``: no resize; the crop then scales).
        crop: side of the square centre crop, the network input size.
        mean, std: per-channel normalisation applied to ``[0, 1]`` pixels.
        channels: 3 for RGB models, 1 for grayscale ones (MNIST-like).
        interpolation: the resize filter the weights were evaluated with: ``"bilinear"``
            (torchvision's default), ``"bicubic"`` (EfficientNet, Swin, most timm models),
            ``"nearest"``, ``"lanczos"``, ``"box"`` or ``"hamming"``.
    """

    resize: int | None
    crop: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(_FILTERS)}, not {self.interpolation!r}")

    @property
    def _filter(self) -> Image.Resampling:
        return _FILTERS[self.interpolation]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.crop, self.crop)

    @property
    def decode_side(self) -> int:
        """Shorter side ``load_image`` decodes down to: ``REDUCING_GAP`` times the resize target."""
        return REDUCING_GAP * (self.resize if self.resize is not None else self.crop)

    def load_image(self, path: str | os.PathLike[str], *, max_pixels: int = 100_000_000) -> Image.Image:
        """Decode an image file for this model, at reduced size when it is large.

        ``convscope.load_image(path, reduce_to=self.decode_side)``: a JPEG decodes at 1/2, 1/4
        or 1/8 scale (draft mode), any image is then box-averaged by a whole factor, keeping
        the shorter side at least three times the resize target; memory per image then depends on
        the model's input size, not on the photo's pixel count (a 6000x4000 JPEG for a
        256-pixel resize decodes at 1500x1000: 4.5 MB instead of 72 MB). ``to_pil`` and
        ``to_tensor`` resize the result exactly as the full image (same output size, same
        sample positions, see ``imageio.ReducedSource``).

        The tensor differs from the one of the full decode only by the anti-aliasing: box
        averaging (or the decoder's scaled inverse DCT) followed by a bilinear filter at least
        3x wide, instead of one wide bilinear filter. Measured in 0..255 pixel units: mean
        0.1-0.15 and max 1 on camera-size photos, mean 0.5 and max 5 on per-pixel noise with
        1-pixel lines, the worst case (``tests/test_memory.py`` pins both); images whose
        shorter side is under three times the target decode in full and give identical tensors.

        Raises:
            ImageError: as ``convscope.load_image``.
        """
        return _load_image(path, max_pixels=max_pixels, reduce_to=self.decode_side)

    def to_pil(self, image: Image.Image) -> Image.Image:
        """Resize and centre-crop a PIL image to the network's view of it (no normalisation).

        An image from ``load_image(..., reduce_to=)`` is resized as its full-size original
        would be (output size and sample positions from the full image)."""
        if not isinstance(image, Image.Image):
            raise BadInputType("image", f"expected a PIL image, got {type(image).__name__}")
        source = image.info.get(SOURCE_INFO)
        if isinstance(source, ReducedSource) and source.size == image.size:
            (w, h), box = source.full_size, source.box
        else:
            (w, h), box = image.size, None
        mode = "L" if self.channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        if self.resize is None:
            return _without_source(image.resize((self.crop, self.crop), self._filter, box=box))
        scale = self.resize / min(w, h)
        # Match torchvision's Resize(int): shorter side exactly `resize`, the other truncated.
        if w <= h:
            size = (self.resize, int(self.resize * h / w))
        else:
            size = (int(self.resize * w / h), self.resize)
        if scale != 1.0 or box is not None:
            image = image.resize(size, self._filter, box=box)
        w, h = image.size
        left = round((w - self.crop) / 2.0)
        top = round((h - self.crop) / 2.0)
        return _without_source(image.crop((left, top, left + self.crop, top + self.crop)))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # here, not at the top: model registry rows hold a Preprocess and import without torch

        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std

    def to_tensor(self, images: Image.Image | Sequence[Image.Image], *, argument: str = "images") -> torch.Tensor:
        """Images -> normalised batch.

        Args:
            images: a PIL image or a non-empty list/tuple of them (any mode: converted to RGB,
                or grey for 1-channel models). Files are not read here: decode them with
                ``self.load_image(path)`` (reduced size for big photos) or
                ``convscope.load_image(path)``.
            argument: the name used in error messages.

        Returns:
            ``(N, C, crop, crop)`` float32.

        Raises:
            BadInputType: not a PIL image or a sequence of them (``None``, a path, a numpy
                array, a list holding ``None``...); the message names the first bad item.
            BadInput: an empty list.
        """
        items = _image_list(images, argument)
        arrays = []
        for image in items:
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


def _without_source(image: Image.Image) -> Image.Image:
    # Pillow copies ``info`` into derived images; the network view is not a reduced decode.
    image.info.pop(SOURCE_INFO, None)
    return image


def _image_list(images: Any, argument: str) -> list[Image.Image]:
    expected = "a PIL image or a list of them"
    if isinstance(images, Image.Image):
        return [images]
    import torch  # here, not at the top: registry rows hold a Preprocess and import without torch

    from convscope.validate import describe, refuse_non_image
    refuse_non_image(images, argument, expected)
    if not isinstance(images, (list, tuple)):
        raise BadInputType(argument, f"expected {expected}, got {describe(images)}")
    if not images:
        raise BadInput(argument, f"empty {type(images).__name__}: give at least one image")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            hint = None
            if isinstance(image, (str, os.PathLike)):
                hint = "decode files with convscope.load_image(path) first"
            elif isinstance(image, torch.Tensor):
                hint = "pass tensors as one normalised (N, C, H, W) batch, e.g. torch.stack(list)"
            raise BadInputType(f"{argument}[{index}]", f"expected a PIL image, got {describe(image)}", hint)
    return list(images)


IMAGENET = Preprocess(resize=256, crop=224)
