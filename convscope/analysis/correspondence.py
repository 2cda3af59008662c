"""Part correspondence (Zeiler & Fergus 2014, §4.3, Table 1): does the network find the same
object part in different images?

For a part (an eye, the nose) each image ``i`` is shown once as it is and once with the part
covered; at layer ``l`` the change is ``ε_i = x_i − x̃_i`` (flattened feature vectors). If the
network represents the part the same way everywhere, covering it changes the features the same
way, and the signs of ``ε`` agree across images:

    Δ_l = Σ_{i≠j} H(sign ε_i, sign ε_j)

with ``H`` the Hamming distance (the number of positions where the signs differ; ``sign`` is
−1, 0 or +1). Δ is reported raw and normalised by the vector length ``D`` and the ``N(N − 1)``
ordered pairs: the paper's "mean feature sign change", in ``[0, 1]``. Lower is more consistent.
The control covers boxes of the same size at random places (the same place in every image).

Boxes are ``(top, left, bottom, right)`` in pixels of the decoded image (bottom/right
exclusive), covered with the model's mean colour before preprocessing (so the cover is 0 in
the normalised input wherever resizing leaves it untouched). The pairwise matrix comes from
three indicator matrix products (one per sign value), not a double loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from convscope.analysis._features import CLASSIFIER_INPUT, forward_features
from convscope.analysis.limits import MAX_RANDOM
from convscope.errors import BadArgument, UnknownLayer
from convscope.methods._common import ModelLike
from convscope.models.load import as_loaded
from convscope.parsing import shown
from convscope.probes.layers import alias_of
from convscope.types import LoadedModel

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SignChange:
    """Δ for one covered region at one layer.

    Attributes:
        delta: raw Σ over ordered pairs ``i ≠ j`` of the Hamming distance of the sign vectors.
        normalized: ``delta / (N (N - 1) D)``, the mean feature sign change in ``[0, 1]``.
        std: standard deviation over the ordered pairs of ``H / D``.
        pairs: ``(N, N)`` int64 Hamming distances (zero diagonal).
    """

    delta: int
    normalized: float
    std: float
    pairs: torch.Tensor


@dataclass(frozen=True)
class RandomControl:
    """Δ of ``R`` random boxes at one layer.

    Attributes:
        draws: one ``SignChange`` per random box set.
        mean, std: mean and standard deviation over the draws of ``normalized``.
    """

    draws: tuple[SignChange, ...]
    mean: float
    std: float


@dataclass(frozen=True)
class Correspondence:
    """Table 1 of Zeiler & Fergus for ``N`` images.

    Attributes:
        layers: layer names as given.
        dimensions: layer -> ``D``, the feature vector length.
        parts: part names, in the order given.
        boxes: part -> one box per image (after ``window``), decoded-image pixels.
        parts_delta: layer -> part -> ``SignChange``.
        random: layer -> ``RandomControl``.
        random_boxes: one tuple of per-image boxes per random draw; draw ``r`` has the size of
            part ``r mod P``.
        window: 0 (boxes as given) or the side of the squares centred on each part.
        count: ``N``.
    """

    layers: tuple[str, ...]
    dimensions: dict[str, int]
    parts: tuple[str, ...]
    boxes: dict[str, tuple[Box, ...]]
    parts_delta: dict[str, dict[str, SignChange]]
    random: dict[str, RandomControl]
    random_boxes: tuple[tuple[Box, ...], ...]
    window: int
    count: int


def hamming_pairs(changes: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` int64 Hamming distances between the sign vectors of ``(N, D)`` changes."""
    signs = torch.sign(changes)
    agree = torch.zeros(changes.shape[0], changes.shape[0], dtype=torch.float64)
    for value in (-1.0, 0.0, 1.0):
        indicator = (signs == value).double()
        agree += indicator @ indicator.T
    return (changes.shape[1] - agree).round().long()


def sign_change(changes: torch.Tensor) -> SignChange:
    """Δ of ``(N, D)`` feature changes, ``N >= 2``."""
    count, dimension = changes.shape
    pairs = hamming_pairs(changes)
    off = ~torch.eye(count, dtype=torch.bool)
    per_pair = pairs[off].double() / dimension
    delta = int(pairs[off].sum())
    return SignChange(
        delta=delta,
        normalized=delta / (count * (count - 1) * dimension),
        std=float(per_pair.std(unbiased=False)),
        pairs=pairs,
    )


def parse_parts(parts: Mapping[str, Any], sizes: Sequence[tuple[int, int]], names: Sequence[str] | None = None) -> dict[str, tuple[Box, ...]]:
    """Part boxes, one per image, from a PARTS mapping.

    Each part maps to one box ``[top, left, bottom, right]`` for every image, a list of boxes
    (one per image, in order), or ``{image name: box}``. ``sizes`` are the images' ``(height,
    width)``; ``names`` the image names for the mapping form.

    Raises:
        BadArgument: a malformed, empty, non-finite or out-of-image box, or a missing image.
    """
    if not isinstance(parts, Mapping) or not parts:
        raise BadArgument("--parts", "must map part names to boxes [top, left, bottom, right]")
    out: dict[str, tuple[Box, ...]] = {}
    for part, spec in parts.items():
        if isinstance(spec, Mapping):
            if names is None:
                raise BadArgument(f"--parts {part}", "boxes keyed by image name need the image names")
            missing = [n for n in names if n not in spec]
            if missing:
                raise BadArgument(f"--parts {part}", f"has no box for image {missing[0]}")
            raw = [spec[n] for n in names]
        elif isinstance(spec, Sequence) and len(spec) == 4 and all(_is_number(v) for v in spec):
            raw = [spec] * len(sizes)
        elif isinstance(spec, Sequence) and len(spec) == len(sizes):
            raw = list(spec)
        else:
            raise BadArgument(f"--parts {part}", f"needs one box [top, left, bottom, right] or one per image ({len(sizes)})")
        boxes = []
        for box, (height, width) in zip(raw, sizes, strict=True):
            if not (isinstance(box, Sequence) and len(box) == 4 and all(_is_number(v) for v in box)):
                raise BadArgument(f"--parts {part}", f"box {shown(box, 80)} is not [top, left, bottom, right]")
            if not all(math.isfinite(v) for v in box):
                raise BadArgument(f"--parts {part}", f"box {shown(box, 80)}: coordinates must be finite numbers")
            top, left, bottom, right = (int(v) for v in box)
            if not (0 <= top < bottom <= height and 0 <= left < right <= width):
                raise BadArgument(f"--parts {part}", f"box {[top, left, bottom, right]} is empty or outside a {height}x{width} image")
            boxes.append((top, left, bottom, right))
        out[str(part)] = tuple(boxes)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def square(box: Box, side: int, height: int, width: int) -> Box:
    """A ``side x side`` box centred on ``box``, shifted to lie inside the image."""
    side_y, side_x = min(side, height), min(side, width)
    centre_y, centre_x = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    top = int(min(max(round(centre_y - side_y / 2), 0), height - side_y))
    left = int(min(max(round(centre_x - side_x / 2), 0), width - side_x))
    return top, left, top + side_y, left + side_x


def cover(image: Image.Image, box: Box, colour: Sequence[int]) -> Image.Image:
    """A copy of ``image`` with ``box`` painted ``colour``."""
    array = np.array(image)
    top, left, bottom, right = box
    array[top:bottom, left:right] = colour if array.ndim == 3 else colour[0]
    return Image.fromarray(array, mode=image.mode)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:  # skimage's float images in [0, 1]
        array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def default_layers(loaded: LoadedModel) -> list[str]:
    """The paper's layers 5 and 7: the last conv stage and the classifier's input vector."""
    if not loaded.cam_layer:
        raise UnknownLayer(loaded.name, "has no default conv layer", "name the layers with layers=/--layers")
    return [alias_of(loaded, loaded.cam_layer), CLASSIFIER_INPUT]


def correspondence(
    model: ModelLike,
    images: Sequence[Any],
    parts: Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
    random: int = 10,
    window: int = 0,
    names: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Correspondence:
    """Mean feature sign change of each part and of random boxes, per layer.

    Args:
        model: a ``LoadedModel`` or ``nn.Module``.
        images: at least two decoded images (PIL, uint8 arrays or float arrays in ``[0, 1]``).
        parts: part name -> box(es), see :func:`parse_parts`.
        layers: aliases, module paths or ``"classifier_input"``; default: the last conv stage
            and ``"classifier_input"``.
        random: number of random box sets for the control (0: none).
        window: 0 to use the boxes as given, else the side of a square centred on each box.
        names: image names, for boxes keyed by name.
        seed: for the random boxes.
        progress: called with the number of images finished after each forward pass.

    Returns:
        ``Correspondence``.

    Raises:
        BadArgument: fewer than two images, bad boxes, ``random`` outside ``0..MAX_RANDOM`` (10000),
            a negative ``window``.
        UnknownLayer: a layer name that does not resolve.
    """
    loaded = as_loaded(model)
    mode = "L" if loaded.preprocess.channels == 1 else "RGB"
    pictures = [_as_pil(image).convert(mode) for image in images]
    if len(pictures) < 2:
        raise BadArgument("IMAGES", f"correspondence compares images pairwise: give at least 2, got {len(pictures)}")
    if not 0 <= random <= MAX_RANDOM:
        raise BadArgument("--random", f"must be between 0 and {MAX_RANDOM}, got {random}")
    if window < 0:
        raise BadArgument("--window", f"must be 0 or more, got {window}")
    sizes = [(p.height, p.width) for p in pictures]
    boxes = parse_parts(parts, sizes, names)
    if window:
        boxes = {part: tuple(square(b, window, h, w) for b, (h, w) in zip(bs, sizes, strict=True)) for part, bs in boxes.items()}
    names_layers = list(layers) if layers else default_layers(loaded)
    colour = [round(255 * m) for m in loaded.preprocess.mean]

    def features_of(covered: Sequence[Box] | None) -> dict[str, torch.Tensor]:
        copies = pictures if covered is None else [cover(p, b, colour) for p, b in zip(pictures, covered, strict=True)]
        _, features = forward_features(loaded, loaded.preprocess.to_tensor(copies), names_layers,
                                       batch_size=batch_size, progress=progress)
        return features

    clean = features_of(None)
    parts_delta: dict[str, dict[str, SignChange]] = {name: {} for name in names_layers}
    for part, part_boxes in boxes.items():
        covered = features_of(part_boxes)
        for name in names_layers:
            parts_delta[name][part] = sign_change(clean[name] - covered[name])
    generator = np.random.default_rng(seed)
    part_names = list(boxes)
    random_boxes: list[tuple[Box, ...]] = []
    draws: dict[str, list[SignChange]] = {name: [] for name in names_layers}
    for r in range(random):
        template = boxes[part_names[r % len(part_names)]]
        where = generator.random(2)  # one relative position for every image
        placed = []
        for (top, left, bottom, right), (height, width) in zip(template, sizes, strict=True):
            box_h, box_w = bottom - top, right - left
            new_top = math.floor(where[0] * (height - box_h + 1))
            new_left = math.floor(where[1] * (width - box_w + 1))
            placed.append((new_top, new_left, new_top + box_h, new_left + box_w))
        random_boxes.append(tuple(placed))
        covered = features_of(placed)
        for name in names_layers:
            draws[name].append(sign_change(clean[name] - covered[name]))
    control = {}
    for name in names_layers:
        values = torch.tensor([d.normalized for d in draws[name]], dtype=torch.float64)
        control[name] = RandomControl(
            draws=tuple(draws[name]),
            mean=float(values.mean()) if random else math.nan,
            std=float(values.std(unbiased=False)) if random else math.nan,
        )
    return Correspondence(
        layers=tuple(names_layers),
        dimensions={name: int(clean[name].shape[1]) for name in names_layers},
        parts=tuple(part_names),
        boxes=boxes,
        parts_delta=parts_delta,
        random=control,
        random_boxes=tuple(random_boxes),
        window=window,
        count=len(pictures),
    )
