"""Invariance curves (Zeiler & Fergus 2014, Fig. 5): how far features and the class probability
move when the image is translated, scaled or rotated.

The transform is applied to the decoded image, before the model's own resize, crop and
normalisation, as the paper does; the transformed picture is rounded back to 8 bits, exactly
like a file on disk would be. Geometry:

* ``translate``: vertical shift by whole pixels, ``amount`` in pixels of the network input
  (positive moves the content down); on the decoded image the shift is scaled by the resize
  factor and rounded. Default −60..60 in steps of 5, as in the paper.
* ``scale``: zoom about the centre by ``amount`` (1.0–1.8 in steps of 0.05 by default).
* ``rotate``: rotation about the centre by ``amount`` degrees, counter-clockwise as displayed
  (0–360 in steps of 10 by default).

Uncovered border pixels are filled with the image's mean colour (``pad="mean"``, default) or a
mirror image of the inside (``pad="reflect"``). Bilinear sampling is used for scale and
rotation. An identity amount (shift 0, zoom 1, any multiple of 360°) reuses the original
forward pass, so its distance is exactly 0 and its probability is the untransformed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from convscope.analysis._features import default_layers, forward_features
from convscope.analysis.limits import MAX_AMOUNT, MAX_AMOUNTS
from convscope.errors import BadArgument
from convscope.methods._common import ModelLike
from convscope.methods.targets import TargetLike, resolve_targets, target_labels
from convscope.models.load import as_loaded
from convscope.preprocess import Preprocess

TRANSFORMS = ("translate", "scale", "rotate")
PADS = ("mean", "reflect")
DEFAULT_AMOUNTS: dict[str, tuple[float, ...]] = {
    "translate": tuple(float(a) for a in range(-60, 61, 5)),
    "scale": tuple(round(1.0 + 0.05 * i, 2) for i in range(17)),
    "rotate": tuple(float(a) for a in range(0, 361, 10)),
}


@dataclass(frozen=True)
class InvarianceCurves:
    """Feature distances and class probability along one transform, for ``N`` images and ``A``
    amounts.

    Attributes:
        transform: ``"translate"``, ``"scale"`` or ``"rotate"``.
        amounts: the ``A`` amounts (pixels of the network input, zoom factor, or degrees).
        layers: layer names as given (``"classifier_input"``: the input of the last linear layer).
        pad: ``"mean"`` or ``"reflect"``.
        targets: ``(N,)`` int64 class whose probability is tracked; ``labels`` their names.
        distance: layer -> ``(N, A)`` float32 Euclidean distance between the flattened layer
            output of the transformed and the original image (exactly 0 at an identity amount).
        relative_distance: layer -> ``(N, A)`` float32 the distance over the original vector's
            norm (``nan`` when that norm is 0).
        probability: ``(N, A)`` float32 softmax probability of the target.
        top_class: ``(N, A)`` int64 most probable class; ``class_names`` names each one seen.
    """

    transform: str
    amounts: tuple[float, ...]
    layers: tuple[str, ...]
    pad: str
    targets: torch.Tensor
    labels: tuple[str, ...]
    distance: dict[str, torch.Tensor]
    relative_distance: dict[str, torch.Tensor]
    probability: torch.Tensor
    top_class: torch.Tensor
    class_names: dict[int, str]


def is_identity(transform: str, amount: float) -> bool:
    if transform == "translate":
        return amount == 0
    if transform == "scale":
        return amount == 1
    return amount % 360 == 0


def _check(transform: str, amounts: Sequence[float], pad: str) -> None:
    if transform not in TRANSFORMS:
        raise BadArgument(f"--transform {transform}", "must be one of " + ", ".join(TRANSFORMS))
    if pad not in PADS:
        raise BadArgument(f"--pad {pad}", "must be one of " + ", ".join(PADS))
    if not amounts:
        raise BadArgument("--amounts", "needs at least one amount")
    if len(amounts) > MAX_AMOUNTS:
        raise BadArgument("--amounts", f"gives {len(amounts)} amounts, over the limit of {MAX_AMOUNTS}")
    for amount in amounts:
        if not math.isfinite(amount):
            raise BadArgument("--amounts", f"{amount} is not a finite number")
        if abs(amount) > MAX_AMOUNT:
            raise BadArgument("--amounts", f"{amount:g} must be between {-MAX_AMOUNT:g} and {MAX_AMOUNT:g}")
        if transform == "scale" and amount <= 0:
            raise BadArgument("--amounts", f"a zoom factor must be positive, got {amount}")


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image))
    raise TypeError(f"invariance transforms decoded images (PIL or uint8 arrays), not {type(image).__name__}")


def input_pixel_size(image: Image.Image, preprocess: Preprocess) -> tuple[float, float]:
    """Decoded-image pixels per network-input pixel, ``(vertical, horizontal)``."""
    width, height = image.size
    if preprocess.resize is None:
        return height / preprocess.crop, width / preprocess.crop
    factor = min(width, height) / preprocess.resize
    return factor, factor


def transform_image(
    image: Any, transform: str, amount: float, *, pad: str = "mean", preprocess: Preprocess | None = None
) -> Image.Image:
    """One transformed copy of a decoded image (the original itself at an identity amount).

    Args:
        image: PIL image or ``(H, W[, C])`` uint8 array.
        transform, amount: see the module notes.
        pad: ``"mean"`` or ``"reflect"``.
        preprocess: the model's preprocessing, to convert a translation from network-input
            pixels to decoded pixels (``None``: ``amount`` is in decoded pixels).
    """
    _check(transform, [amount], pad)
    picture = _as_pil(image)
    if is_identity(transform, amount):
        return picture
    array = np.asarray(picture)
    gray = array.ndim == 2
    pixels = torch.from_numpy((array[:, :, None] if gray else array).astype(np.float32)).permute(2, 0, 1)[None]
    if transform == "translate":
        per_pixel = input_pixel_size(picture, preprocess)[0] if preprocess is not None else 1.0
        moved = _shift_rows(pixels, round(amount * per_pixel), pad)
    else:
        moved = _resample(pixels, transform, amount, pad)
    out = moved[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(out[:, :, 0] if gray else out, mode=picture.mode)


def _shift_rows(pixels: torch.Tensor, shift: int, pad: str) -> torch.Tensor:
    height = pixels.shape[-2]
    rows = torch.arange(height) - shift
    inside = (rows >= 0) & (rows < height)
    if pad == "reflect":
        period = 2 * height
        rows = rows % period
        rows = torch.where(rows >= height, period - 1 - rows, rows)  # mirror, edge row repeated
        return pixels[:, :, rows]
    mean = pixels.mean(dim=(2, 3), keepdim=True)
    moved = pixels[:, :, rows.clamp(0, height - 1)]
    return torch.where(inside[None, None, :, None], moved, mean.expand_as(moved))


def _resample(pixels: torch.Tensor, transform: str, amount: float, pad: str) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if transform == "scale":
        inverse = torch.eye(2, dtype=torch.float64) / amount
    else:
        # Counter-clockwise on screen (y points down): the source of an output point is the
        # point rotated clockwise.
        angle = math.radians(amount)
        cos, sin = math.cos(angle), math.sin(angle)
        inverse = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    # affine_grid works in coordinates normalised per axis; rotate in pixel units.
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2], dtype=torch.float64))
    theta = torch.linalg.inv(to_pixels) @ inverse @ to_pixels
    theta = torch.cat([theta, torch.zeros(2, 1, dtype=torch.float64)], dim=1)[None].float()
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    if pad == "reflect":
        return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = pixels.mean(dim=(2, 3), keepdim=True)
    return F.grid_sample(pixels - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + mean


def invariance(
    model: ModelLike,
    images: Any,
    transform: str = "translate",
    amounts: Sequence[float] | None = None,
    *,
    layers: Sequence[str] | None = None,
    target: TargetLike = None,
    pad: str = "mean",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> InvarianceCurves:
    """Transform each image by each amount and measure how its features and prediction move.

    All copies of one image (the original and every non-identity amount) run as batches of
    ``batch_size``, each made just before its forward pass.

    Args:
        model: a ``LoadedModel`` or ``nn.Module``.
        images: decoded image(s): PIL images or uint8 arrays (not normalised tensors: the
            transform happens before preprocessing).
        transform: ``"translate"``, ``"scale"`` or ``"rotate"``.
        amounts: default ``DEFAULT_AMOUNTS[transform]`` (the paper's ranges).
        layers: aliases, module paths or ``"classifier_input"``; default: the first conv stage
            and ``"classifier_input"``.
        target: class to track: ``None`` (each original's top-1), an index or label, or one per
            image.
        pad: ``"mean"`` or ``"reflect"``.
        progress: called with the number of copies finished after each forward pass.

    Returns:
        ``InvarianceCurves`` with ``(N, A)`` tensors.

    Raises:
        BadArgument: unknown transform or pad, no amounts or more than ``MAX_AMOUNTS`` (1000),
            an amount that is not finite or beyond ``MAX_AMOUNT`` (1e6) in size, a non-positive zoom.
        UnknownLayer: a layer name that does not resolve.
        BadTarget: unknown class index or label.
    """
    loaded = as_loaded(model)
    if isinstance(amounts, Sized) and len(amounts) > MAX_AMOUNTS:  # before copying a huge range
        raise BadArgument("--amounts", f"gives {len(amounts)} amounts, over the limit of {MAX_AMOUNTS}")
    chosen = tuple(float(a) for a in (DEFAULT_AMOUNTS.get(transform, ()) if amounts is None else amounts))
    _check(transform, chosen, pad)
    if batch_size < 1:
        raise BadArgument("--batch-size", f"must be at least 1, got {batch_size}")
    pictures = [_as_pil(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
    names = list(layers) if layers else default_layers(loaded)
    moving = [i for i, a in enumerate(chosen) if not is_identity(transform, a)]
    # column of each amount in the per-image batch: 0 is the original
    column = torch.zeros(len(chosen), dtype=torch.int64)
    column[moving] = torch.arange(1, len(moving) + 1)
    probabilities: list[torch.Tensor] = []
    originals: list[torch.Tensor] = []
    distances: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    relative: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for picture in pictures:
        # Copies are made one batch at a time, so memory holds one batch of pictures and features,
        # however many amounts there are.
        order: list[int | None] = [None, *moving]  # None: the original
        chunks: list[torch.Tensor] = []
        gaps: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        first: dict[str, torch.Tensor] = {}
        for start in range(0, len(order), batch_size):
            copies = [picture if i is None else
                      transform_image(picture, transform, chosen[i], pad=pad, preprocess=loaded.preprocess)
                      for i in order[start:start + batch_size]]
            probs, features = forward_features(loaded, loaded.preprocess.to_tensor(copies), names,
                                               batch_size=batch_size, progress=progress)
            chunks.append(probs)
            for name in names:
                first.setdefault(name, features[name][:1])
                gaps[name].append((features[name] - first[name]).norm(dim=1))
        probs = torch.cat(chunks)
        probabilities.append(probs[column])
        originals.append(probs[0])
        for name in names:
            gap = torch.cat(gaps[name])
            gap[0] = 0.0
            norm = first[name][0].norm()
            distances[name].append(gap[column])
            relative[name].append(gap[column] / norm if norm > 0 else torch.full_like(gap[column], math.nan))
    probability = torch.stack(probabilities)  # (N, A, K)
    targets = resolve_targets(target, torch.stack(originals), loaded.categories, loaded.name)
    top = probability.argmax(dim=2)
    seen = sorted({int(c) for c in top.flatten().tolist()} | {int(t) for t in targets.tolist()})
    return InvarianceCurves(
        transform=transform,
        amounts=chosen,
        layers=tuple(names),
        pad=pad,
        targets=targets,
        labels=target_labels(targets, loaded.categories),
        distance={n: torch.stack(v) for n, v in distances.items()},
        relative_distance={n: torch.stack(v) for n, v in relative.items()},
        probability=probability.gather(2, targets[:, None, None].expand(-1, len(chosen), 1))[:, :, 0],
        top_class=top,
        class_names=dict(zip(seen, target_labels(torch.tensor(seen, dtype=torch.int64), loaded.categories), strict=True)),
    )

