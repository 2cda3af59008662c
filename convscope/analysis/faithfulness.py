"""Faithfulness as Quantus measures it: Pixel-Flipping and Region-Perturbation, batched.

Quantus (Hedström et al., JMLR 2023) is the implementation papers cite, so ``--protocol quantus``
reproduces its numbers, not just its idea. What it does (version 0.6, read from its source):

- **Attributions.** A ``(N, H, W)`` map is given a channel axis and broadcast over the image's
  ``C`` channels, so a pixel is ``C`` features of equal value. With ``normalise=True`` (Quantus'
  default) the maps are divided by the largest absolute value over *every map of the call*
  (``normalise_by_max`` over all axes, the batch included); ``abs=False`` by default, so a
  signed map is ranked by its signed value, positive evidence first.
- **Order.** Most relevant first (MoRF): numpy's ``argsort`` of the negated float32 values.
  That sort is not stable, and CAMs have large tied regions (zeros after the ReLU), so the order
  of ties decides which features go first. This module sorts the same array with the same
  numpy call, so ties fall exactly as in Quantus.
- **"black".** Not zero and not the mean colour: each image's minimum over all its channels
  and pixels in the (normalised) input, per image.
- **Pixel-Flipping** (Bach et al. 2015). Step ``k`` of ``ceil(C·H·W / features_in_step)``
  replaces the first ``k · features_in_step`` features of the order (single channel values,
  not whole pixels) by black and records the model's score of the target; there is no point for
  the clean image. ``H·W`` must be a multiple of ``features_in_step`` (Quantus' own check).
- **Region-Perturbation** (Samek et al. 2016). The image and the map are padded to a multiple
  of ``patch_size`` (the split ``floor/ceil`` of the remainder; the map with zeros), cut into
  non-overlapping ``patch_size²`` blocks in raster order, and each block is scored by the float32
  sum of its map values over channels and pixels. Step ``k`` of ``min(regions_evaluation,
  blocks)`` blacks out the ``k`` best blocks (the part inside the image) and records the *drop*
  ``score(clean) − score(perturbed)``. Quantus 0.6's ``RegionPerturbation`` has ``patch_size``
  and ``regions_evaluation``, no ``features_in_step``.
- **Score.** ``softmax=True``: the softmax probability of the target class (logits otherwise).
- **AUC.** What Quantus reports (``return_auc_per_sample``, ``get_auc_score``): the trapezoid
  rule with unit spacing over the curve's points (``np.trapz(curve, dx=1)``), so it grows with the
  number of steps. Lower is better for Pixel-Flipping; for Region-Perturbation a faithful map has
  a *high* curve (large drops early).

Quantus runs one forward of the ``N`` images per step, in a Python loop. Here every step of every
image is one copy, built on the fly from a per-feature rank (``rank < threshold`` is the set
flipped so far) and run in chunks whose size a memory budget sets, so the cost is the forwards
themselves. A step that flips only features already at the image's "black" makes the same copy as
the step before; it is not run again and takes that step's score (``forwards`` counts the copies
run: on Fashion-MNIST, where about half of an image is background at its minimum, half of them).

Quantus' own speed sets a ceiling on the gain: on ``zfnet_mnist`` with ``features_in_step=1`` it
runs 6,272 copies in 0.87-0.95 s (7,000 copies/s), while the network's fastest forward here, the
fused inference copy in batches, does about 13,000 images/s. On inputs with no background the same
copies cannot run more than about 2x faster; only skipping work can go further (the steps above,
or an incremental forward, which on this net could save at most about 43% of the multiply-adds:
one input pixel reaches 2x2 cells of the 14x14 maps but nearly all of the 7x7 ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from convscope.errors import BadArgument
from convscope.methods._common import ModelLike
from convscope.models.load import as_loaded
from convscope.probes.fold import fold_batchnorm
from convscope.probes.hooks import eval_mode
from convscope.runtime import allocator_tuned

METRICS = ("pixel_flipping", "region_perturbation")
ORDERS = ("morf", "lerf")
# Bytes a copy costs in a forward, as a multiple of its input size (a conservative bound on the
# widest activations alive at once: a first layer of 32 channels on a grey image is 32x); with
# ``memory_mb`` it caps the copies per forward.
ACTIVATION_FACTOR = 32


@dataclass(frozen=True)
class QuantusSettings:
    """The protocol's settings (recorded with the numbers).

    Attributes:
        features_in_step: Pixel-Flipping features (channel values) flipped per step.
        patch_size: Region-Perturbation block side, in pixels.
        regions_evaluation: Region-Perturbation blocks perturbed (at most).
        order: ``"morf"`` (most relevant first, Quantus' default) or ``"lerf"``.
        abs: rank ``|map|`` instead of the signed map.
        normalise: divide by the largest ``|value|`` over all maps of the call (no effect on the
            order except through float32 rounding, kept so ties match Quantus).
        softmax: score is the softmax probability (else the logit).
    """

    features_in_step: int
    patch_size: int = 8
    regions_evaluation: int = 100
    order: str = "morf"
    abs: bool = False
    normalise: bool = True
    softmax: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": "Quantus 0.6 PixelFlipping / RegionPerturbation",
            "features_in_step": self.features_in_step,
            "patch_size": self.patch_size,
            "regions_evaluation": self.regions_evaluation,
            "order": self.order,
            "perturb_baseline": "black (per-image minimum of the normalised input)",
            "abs": self.abs,
            "normalise": "normalise_by_max over all maps of the call" if self.normalise else False,
            "score": "softmax" if self.softmax else "logit",
            "auc": "trapezoid, dx=1 (np.trapz)",
        }


@dataclass(frozen=True)
class QuantusCurves:
    """One metric's curves for one method's maps on ``N`` images.

    Attributes:
        metric: ``"pixel_flipping"`` or ``"region_perturbation"``.
        values: ``(N, S)`` float32: the target's score after each step (Pixel-Flipping) or its
            drop from the clean image (Region-Perturbation), as Quantus returns them.
        auc: ``(N,)`` float64 ``np.trapz(values, dx=1)`` per image.
        forwards: image copies run for these curves: ``N · S``, less one for each step that
            changes no feature (all it flips is already the image's "black"; it has the score of
            the step before, as the identical copy would).
    """

    metric: str
    values: torch.Tensor
    auc: torch.Tensor
    forwards: int

    def as_dict(self) -> dict[str, Any]:
        return {"curves": self.values.tolist(), "auc": self.auc.tolist(),
                "mean_auc": float(self.auc.mean()) if len(self.auc) else math.nan, "forwards": self.forwards}


@dataclass(frozen=True)
class QuantusFaithfulness:
    """Quantus' faithfulness curves of several methods' maps on the same ``N`` images.

    Attributes:
        targets: ``(N,)`` int64 explained classes.
        curves: method -> metric -> ``QuantusCurves`` (metrics in the order asked).
        settings: the protocol.
    """

    targets: torch.Tensor
    curves: Mapping[str, Mapping[str, QuantusCurves]]
    settings: QuantusSettings

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values: settings, targets, and per method and metric the curves and AUCs."""
        return {
            "protocol": "quantus",
            "settings": self.settings.as_dict(),
            "targets": self.targets.tolist(),
            "methods": {method: {metric: c.as_dict() for metric, c in per.items()}
                        for method, per in self.curves.items()},
        }


# ---------------------------------------------------------------- the attribution side (numpy, as Quantus)


def _features(maps: torch.Tensor, shape: tuple[int, ...], settings: QuantusSettings, scale: np.ndarray | None) -> np.ndarray:
    """``(N, C, H, W)`` float32 attributions as Quantus ranks them: channel axis added, divided
    by ``scale``, absolute value if asked, broadcast over the image's channels."""
    values = maps.detach().float().cpu().numpy()
    if values.ndim == 3:
        values = values[:, None]
    if scale is not None:
        values = np.divide(values, scale)
    if settings.abs:
        values = np.abs(values)
    return np.ascontiguousarray(np.broadcast_to(values, shape))


def _rank(scores: np.ndarray, order: str) -> np.ndarray:
    """``(N, F)`` int64 position of each column in the order (0: perturbed first). numpy's
    default ``argsort`` of the same float32 values as Quantus, so tied columns go in its order."""
    indices = np.argsort(-scores if order == "morf" else scores, axis=-1)
    rank = np.empty_like(indices)
    np.put_along_axis(rank, indices, np.arange(scores.shape[-1])[None].repeat(len(scores), 0), axis=-1)
    return rank


def _padding(size: int, patch: int) -> tuple[int, int]:
    extra = (-size) % patch
    return extra // 2, extra - extra // 2


def _region_rank(features: np.ndarray, settings: QuantusSettings) -> np.ndarray:
    """``(N, 1, H, W)`` int64: the order position of the block each pixel belongs to."""
    count, channels, height, width = features.shape
    patch = settings.patch_size
    (top, bottom), (left, right) = _padding(height, patch), _padding(width, patch)
    padded = np.pad(features, ((0, 0), (0, 0), (top, bottom), (left, right)))
    rows, cols = padded.shape[2] // patch, padded.shape[3] // patch
    # Each block's values in Quantus' gather order (channel, row, column), summed along one
    # contiguous axis as it does, so the float32 sums (and their ties) are the same.
    blocks = padded.reshape(count, channels, rows, patch, cols, patch).transpose(0, 2, 4, 1, 3, 5)
    sums = np.ascontiguousarray(blocks).reshape(count, rows * cols, channels * patch * patch).sum(axis=-1)
    block_rank = _rank(sums, settings.order)
    block_of = ((np.arange(height)[:, None] + top) // patch) * cols + (np.arange(width)[None] + left) // patch
    return block_rank[:, block_of][:, None]


# ---------------------------------------------------------------- the batched perturbation engine


def _changing_steps(batch: torch.Tensor, fills: torch.Tensor, rank: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(N, S)`` bool: whether step ``k`` of image ``n`` sets some feature to a value it did not
    already have. A step that does not (every feature it flips is already the image's "black",
    as a Fashion-MNIST background is) makes the very copy of the step before, so it needs no
    forward of its own. The first step always runs."""
    count, steps = batch.shape[0], len(thresholds)
    flat_rank = rank.expand(batch.shape).reshape(count, -1).cpu()
    differs = (batch != fills.view(-1, 1, 1, 1)).reshape(count, -1).cpu()
    # the step that flips each feature: the first k with rank < thresholds[k] (S: never flipped)
    step = torch.searchsorted(thresholds.contiguous(), flat_rank, right=True)
    changing = torch.zeros(count, steps + 1, dtype=torch.long)
    changing.scatter_add_(1, step, differs.long())
    needed = changing[:, :steps] > 0
    needed[:, 0] = True
    return needed


def _scores(
    net: torch.nn.Module, batch: torch.Tensor, fills: torch.Tensor, rank: torch.Tensor, thresholds: torch.Tensor,
    targets: torch.Tensor, *, softmax: bool, chunk: int, progress: Callable[[int], None] | None,
) -> tuple[torch.Tensor, int]:
    """``(N, S)`` target scores of every copy ``(n, k)``: ``batch[n]`` with the features whose
    ``rank[n] < thresholds[k]`` set to ``fills[n]``, and the number of copies run. Copies are built
    per chunk, never all at once; a copy equal to the one before it (``_changing_steps``) is not
    run again: it takes that copy's score."""
    count, steps = batch.shape[0], len(thresholds)
    needed = _changing_steps(batch, fills, rank, thresholds)
    image_of, step_of = needed.nonzero(as_tuple=True)  # image-major, steps in order
    out = torch.full((count, steps), float("nan"), dtype=torch.float32)
    device = batch.device
    targets = targets.cpu()
    skipped = count * steps - len(image_of)
    if progress is not None and skipped:
        progress(skipped)
    for start in range(0, len(image_of), chunk):
        images = image_of[start:start + chunk]  # CPU indices index tensors on any device
        at = step_of[start:start + chunk]
        limit = thresholds[at].to(device).view(-1, 1, 1, 1)
        copies = torch.where(rank[images] < limit, fills[images].view(-1, 1, 1, 1), batch[images])
        logits = net(copies.contiguous(memory_format=torch.channels_last)).float()
        scores = torch.softmax(logits, dim=1) if softmax else logits
        out[images, at] = scores.gather(1, targets[images].view(-1, 1).to(device))[:, 0].cpu()
        if progress is not None:
            progress(len(images))
    # each skipped step takes the score of the last step run before it
    last_run = torch.where(needed, torch.arange(steps).expand(count, -1), -1).cummax(dim=1).values
    return out.gather(1, last_run), len(image_of)


def _check(
    batch: torch.Tensor, maps: Mapping[str, torch.Tensor], targets: torch.Tensor, metrics: Sequence[str],
    settings: QuantusSettings, memory_mb: int, batch_size: int,
) -> None:
    if batch.ndim != 4:
        raise BadArgument("batch", f"must be (N, C, H, W), got shape {tuple(batch.shape)}")
    count, channels, height, width = batch.shape
    if not metrics:
        raise BadArgument("metrics", "names nothing (choose from " + ", ".join(METRICS) + ")")
    for metric in metrics:
        if metric not in METRICS:
            raise BadArgument(f"metric {metric}", "must be one of " + ", ".join(METRICS))
    if settings.order not in ORDERS:
        raise BadArgument(f"order {settings.order}", "must be one of " + ", ".join(ORDERS))
    if settings.features_in_step < 1 or (height * width) % settings.features_in_step:
        raise BadArgument(f"features_in_step {settings.features_in_step}",
                          f"must divide H x W = {height * width} (Quantus' rule)", f"e.g. {width}")
    if settings.patch_size < 1:
        raise BadArgument(f"patch_size {settings.patch_size}", "must be at least 1 pixel")
    if settings.regions_evaluation < 1:
        raise BadArgument(f"regions_evaluation {settings.regions_evaluation}", "must be at least 1")
    if memory_mb < 1:
        raise BadArgument(f"memory_mb {memory_mb}", "must be at least 1")
    if batch_size < 1:
        raise BadArgument(f"batch_size {batch_size}", "must be at least 1")
    if not maps:
        raise BadArgument("maps", "is empty (give at least one method's maps)")
    if tuple(targets.shape) != (count,):
        raise BadArgument("targets", f"must be ({count},), got shape {tuple(targets.shape)}")
    for method, value in maps.items():
        if tuple(value.shape) not in ((count, height, width), (count, 1, height, width), (count, channels, height, width)):
            raise BadArgument(f"maps[{method}]", f"must be (N, H, W) or (N, C, H, W) like the batch "
                              f"{tuple(batch.shape)}, got {tuple(value.shape)}")


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def quantus_protocol(
    model: ModelLike,
    batch: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    *,
    metrics: Sequence[str] = METRICS,
    features_in_step: int | None = None,
    patch_size: int = 8,
    regions_evaluation: int = 100,
    order: str = "morf",
    abs: bool = False,
    normalise: bool = True,
    softmax: bool = True,
    batch_size: int = 128,
    memory_mb: int = 512,
    progress: Callable[[int], None] | None = None,
) -> QuantusFaithfulness:
    """Quantus' ``PixelFlipping`` curves and ``RegionPerturbation`` curves of each method's maps.

    Args:
        model: a ``LoadedModel`` or ``nn.Module``.
        batch: ``(N, C, H, W)`` normalised images (Quantus' ``x_batch``).
        maps: method name -> ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, C, H, W)`` attributions
            (Quantus' ``a_batch``); each method is normalised over its own maps, as one Quantus call.
        targets: ``(N,)`` explained classes (``y_batch``).
        metrics: any of ``"pixel_flipping"``, ``"region_perturbation"``.
        features_in_step: Pixel-Flipping step, in channel values (default ``W``: ``C · H`` steps;
            Quantus' default of 1 means ``C · H · W`` forwards per image). Must divide ``H · W``.
        patch_size, regions_evaluation, order, abs, normalise, softmax: Quantus' parameters of the
            same names, with its defaults (``perturb_baseline`` is always ``"black"``).
        batch_size: copies per forward at most. The chunk is set by ``memory_mb`` below it: on
            28x28 inputs (channels-last, 2 cores) 6,272 copies took 0.43-0.47 s in chunks of 32-128
            and 0.50 s in chunks of 512-1024 (16 copies per forward ran 5x slower than 512 before
            the small nets ran channels-last), while 224x224 copies stay at about 27 per forward.
        memory_mb: budget for one chunk of copies in flight (their inputs and activations); it
            lowers the chunk below ``batch_size`` for large inputs.

    The copies run through the network with BatchNorm folded into the convolutions
    (``convscope.probes.fold``): probabilities within 1e-6 of the network's, one pass fewer per map.
        progress: called with the number of copies each chunk finished.

    Returns:
        ``QuantusFaithfulness``; ``values`` equal Quantus' lists for the same inputs.

    Raises:
        BadArgument: an unknown metric or order, a ``features_in_step`` that does not divide
            ``H · W``, a patch size below 1, maps or targets of the wrong shape.
    """
    loaded = as_loaded(model)
    batch = batch.detach()
    width = int(batch.shape[-1]) if batch.ndim == 4 else 1
    settings = QuantusSettings(features_in_step=width if features_in_step is None else features_in_step,
                               patch_size=patch_size, regions_evaluation=regions_evaluation, order=order,
                               abs=abs, normalise=normalise, softmax=softmax)
    _check(batch, maps, targets, metrics, settings, memory_mb, batch_size)
    count, channels, height, width = batch.shape
    features = channels * height * width
    chunk = max(1, min(batch_size, memory_mb * 2**20 // (features * batch.element_size() * ACTIVATION_FACTOR)))
    net = fold_batchnorm(loaded.module, batch[:1], fuse=True).module
    device = batch.device
    targets = targets.long().cpu()
    fills = batch.flatten(1).min(dim=1).values  # "black": each image's own minimum
    curves: dict[str, dict[str, QuantusCurves]] = {}
    with eval_mode(net), torch.inference_mode():
        clean = None
        if "region_perturbation" in metrics:
            clean = _scores(net, batch, fills, torch.zeros(count, 1, 1, 1, dtype=torch.long, device=device),
                            torch.zeros(1, dtype=torch.long), targets, softmax=softmax, chunk=chunk, progress=None)[0][:, 0]
        for method, value in maps.items():
            scale = None
            if normalise:
                peak = np.max(np.abs(value.detach().float().cpu().numpy()))
                scale = None if peak == 0 else peak
            ranked = _features(value, (count, channels, height, width), settings, scale)
            curves[method] = {}
            for metric in metrics:
                if metric == "pixel_flipping":
                    rank = torch.from_numpy(_rank(ranked.reshape(count, features), order)).view(count, channels, height, width)
                    steps = math.ceil(features / settings.features_in_step)
                    thresholds = torch.arange(1, steps + 1) * settings.features_in_step
                    values, run = _scores(net, batch, fills, rank.to(device), thresholds, targets,
                                          softmax=softmax, chunk=chunk, progress=progress)
                else:
                    rank = torch.from_numpy(_region_rank(ranked, settings))
                    blocks = int(rank.max()) + 1  # every block reaches into the image: padding < patch
                    thresholds = torch.arange(1, min(regions_evaluation, blocks) + 1)
                    assert clean is not None
                    perturbed, run = _scores(net, batch, fills, rank.to(device), thresholds, targets,
                                             softmax=softmax, chunk=chunk, progress=progress)
                    values = clean[:, None] - perturbed
                auc = ((values[:, 1:].double() + values[:, :-1].double()) / 2).sum(dim=1)
                curves[method][metric] = QuantusCurves(metric=metric, values=values, auc=auc,
                                                       forwards=run)
    return QuantusFaithfulness(targets=targets, curves=curves, settings=settings)
