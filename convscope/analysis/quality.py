"""Is an explanation map faithful to the model? Deletion/insertion and cascading randomisation.

**Deletion and insertion** (Petsiuk et al., RISE, BMVC 2018). Pixels are ranked by the map,
highest first. Deletion replaces them, ``step`` at a time, with a fill; insertion starts from a
blurred copy and puts the original pixels back in the same order. After each step the softmax
probability of the explained class is recorded; the area under that curve, with the fraction of
pixels on the x axis (trapezoid rule, so in ``[0, 1]``), is the score. A faithful map makes the
deletion curve fall fast (low AUC) and the insertion curve rise fast (high AUC).

The default protocol is RISE's own evaluation script, so numbers compare with published tables:
deletion sets the normalised input to 0 (the dataset mean colour); insertion starts from the
normalised input convolved with RISE's kernel (``gaussian_filter`` of an 11x11 impulse with
σ = 5 and scipy's mirror boundary, zero padding of the image); 224 pixels per step at 224²
(``ceil(H * W / 224)`` in general, i.e. 224 steps); ties in the map keep raster order. The first
and last points of a curve do not depend on the map (the clean image, the fully filled one, the
blurred one): they run once per image, and every other step is one copy, all run as batches.

**Randomisation** (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency maps"): see
:mod:`convscope.analysis.sanity`. On a copy of the model, layers are re-initialised (cascading
top down, cascading bottom up, or one at a time) and the map is recomputed for the same class
after each step. A map that explains the model must change: its Spearman rank correlation, SSIM
and HOG similarity with the original map fall. A map that ignores the weights (the edge detector)
stays at 1. The caller's model is never touched.

Baselines: a uniform random map (seeded) and an edge detector (Sobel gradient magnitude of the
grey image); a method that does not beat the random map is flagged by :func:`beats_random`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convscope.analysis.sanity import (
    DEFAULT_MODES,
    MapFunction,
    Randomization,
    attribution_methods,
    check_modes,
    method_aliases,
    method_map,
    randomization,
    spearman,  # noqa: F401  (re-exported: the measures of map quality)
    ssim,  # noqa: F401
)
from convscope.errors import BadArgument, UnknownMethod, close_matches
from convscope.methods._common import ModelLike, prepare
from convscope.methods.targets import TargetLike, resolve_targets, target_labels
from convscope.probes.hooks import eval_mode
from convscope.runtime import allocator_tuned
from convscope.types import LoadedModel

# The registry's attribution methods when this module is imported (the CLI reads the registry
# live: ``sanity.attribution_methods``), and their old spellings, still accepted, listed nowhere.
METHODS = attribution_methods()
OLD_NAMES = method_aliases()
BASELINES = ("random", "edges")
METRICS = ("deletion", "insertion", "randomization")
RISE_STEPS = 224  # RISE: 224 pixels per step at 224 x 224


@dataclass(frozen=True)
class Protocol:
    """How deletion and insertion were run (recorded with the numbers).

    Attributes:
        step: pixels changed per step.
        deletion_fill: value deleted pixels take, in the normalised input space (0: the mean colour).
        blur_kernel, blur_sigma: insertion's starting blur (RISE: 11, 5).
        score: ``"softmax"``: the probability of the explained class.
        auc: ``"trapezoid"`` over the fraction of pixels changed, in ``[0, 1]``.
    """

    step: int
    deletion_fill: float = 0.0
    blur_kernel: int = 11
    blur_sigma: float = 5.0
    score: str = "softmax"
    auc: str = "trapezoid"

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": "Petsiuk et al., RISE (BMVC 2018), evaluation.py defaults",
            "step_pixels": self.step,
            "deletion": {"fill": self.deletion_fill, "space": "normalised input"},
            "insertion": {"start": "gaussian_blur", "kernel": self.blur_kernel, "sigma": self.blur_sigma,
                          "kernel_construction": "gaussian_filter of an impulse, mirror boundary"},
            "score": self.score,
            "auc": self.auc,
            "order": "map value, highest first; ties in raster order",
        }


@dataclass(frozen=True)
class CausalCurves:
    """Deletion or insertion curves of ``N`` images.

    Attributes:
        metric: ``"deletion"`` or ``"insertion"``.
        fractions: ``(S + 1,)`` float32 fraction of pixels deleted/inserted at each point.
        probability: ``(N, S + 1)`` float32 softmax probability of the explained class.
        auc: ``(N,)`` float32 trapezoid area under each curve, in ``[0, 1]``.
        forwards: image copies run through the network for these curves (``S`` per image:
            the middle points and the map-independent endpoint; the clean image is shared).
    """

    metric: str
    fractions: torch.Tensor
    probability: torch.Tensor
    auc: torch.Tensor
    forwards: int


@dataclass(frozen=True)
class QualityResult:
    """Quality measures of one explanation method on ``N`` images.

    Attributes:
        method: method name (a registry row, ``BASELINES``) or the callable's name.
        targets: ``(N,)`` int64 explained classes; ``labels`` their names.
        maps: ``(N, H, W)`` float32 the maps evaluated (as the method returns them).
        deletion, insertion: curves and AUCs (``None`` if not requested).
        randomization: the first randomisation run (top down, unless not requested; ``None``
            without the metric).
        protocol: the deletion/insertion settings.
        randomizations: every randomisation mode run, ``mode -> Randomization``, in order.
    """

    method: str
    targets: torch.Tensor
    labels: tuple[str, ...]
    maps: torch.Tensor
    deletion: CausalCurves | None
    insertion: CausalCurves | None
    randomization: Randomization | None
    protocol: Protocol
    randomizations: dict[str, Randomization] = field(default_factory=dict)


# ---------------------------------------------------------------- maps


RANDOM_GRID = 7


def random_map(loaded: LoadedModel, batch: torch.Tensor, targets: torch.Tensor, layer: str | None, seed: int) -> torch.Tensor:
    """Uniform noise on a ``RANDOM_GRID`` x ``RANDOM_GRID`` grid, bilinearly upsampled (model-free;
    the same for a given seed and size).

    A coarse grid makes the random map delete contiguous regions, as a CAM does. Pixel-level
    noise would delete scattered pixels, and scattered holes break a CNN's prediction faster
    than any coherent region (the inputs leave the image manifold), so every region-based
    method would "lose" to it for reasons that have nothing to do with faithfulness.
    """
    generator = torch.Generator().manual_seed(seed)
    count, _, height, width = batch.shape
    coarse = torch.rand(count, 1, RANDOM_GRID, RANDOM_GRID, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def edge_map(loaded: LoadedModel, batch: torch.Tensor, targets: torch.Tensor, layer: str | None, seed: int) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image (model-free, gradient-free)."""
    pixels = loaded.preprocess.to_display(batch.detach().float()).cpu()
    grey = pixels.mean(dim=1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, sobel.T])[:, None]
    grads = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return grads.pow(2).sum(dim=1).sqrt()


def map_function(method: str | MapFunction) -> tuple[str, MapFunction]:
    """``(name, fn)``; ``fn(loaded, batch, targets, layer, seed)`` returns ``(N, H, W)`` maps.

    ``method`` is a baseline, a registry row ``sanity.attribution_methods`` lists (or an old
    spelling of one), or a callable.
    """
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method == "random":
        return method, random_map
    if method == "edges":
        return method, edge_map
    from convscope.methods.registry import canonical_method_name

    known = attribution_methods()
    name = canonical_method_name(method)
    if name in known:
        return name, method_map(name)
    raise UnknownMethod(method, "is not a method quality can score",
                        close_matches(method, list(known + BASELINES)) or "choose from " + ", ".join(known + BASELINES))


# ---------------------------------------------------------------- deletion / insertion


def rise_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blur kernel: ``scipy.ndimage.gaussian_filter`` of a centred impulse in a
    ``size x size`` array (mirror boundary, truncation at 4 σ), as ``(size, size)`` float32."""
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    # Output cell i gathers input i + t; with scipy's "reflect" (half-sample mirror) boundary the
    # impulse at the centre is reached from every t whose mirrored index is the centre.
    period = 2 * size
    row = torch.zeros(size, dtype=torch.float64)
    for i in range(size):
        index = (i + taps.long()) % period
        index = torch.where(index >= size, period - 1 - index, index)
        row[i] = weights[index == size // 2].sum()
    return torch.outer(row, row).float()


def rise_blur(batch: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Blur each channel with :func:`rise_kernel`, zero padding (RISE's ``conv2d(padding=k//2)``)."""
    channels = batch.shape[1]
    kernel = rise_kernel(size, sigma).to(batch)[None, None].expand(channels, 1, size, size)
    return F.conv2d(batch, kernel, padding=size // 2, groups=channels)


def trapezoid_auc(fractions: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """``(N,)`` area under ``(N, S + 1)`` curves over ``(S + 1,)`` x positions in ``[0, 1]``."""
    widths = fractions[1:] - fractions[:-1]
    return ((probability[:, 1:] + probability[:, :-1]) * widths / 2).sum(dim=1)


def _probabilities(net: nn.Module, copies: torch.Tensor, target: int, batch_size: int) -> torch.Tensor:
    out = [torch.softmax(net(part).float(), dim=1)[:, target] for part in torch.split(copies, batch_size)]
    return torch.cat(out).cpu() if out else torch.empty(0)


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def causal_curves(
    loaded: LoadedModel, batch: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, protocol: Protocol,
    *, clean: torch.Tensor | None = None, batch_size: int = 64, progress: Callable[[int], None] | None = None,
) -> tuple[CausalCurves, CausalCurves]:
    """Deletion and insertion curves of ``(N, H, W)`` maps on a normalised ``(N, C, H, W)`` batch.

    ``clean`` is the ``(N,)`` target probability on the unchanged images, when the caller has
    it already. Each curve of ``S`` steps costs ``S`` image forwards (its ``S - 1`` middle
    points and its map-independent endpoint), run in batches of ``batch_size``.
    """
    count, _, height, width = batch.shape
    pixels = height * width
    steps = math.ceil(pixels / protocol.step)
    changed = torch.clamp(torch.arange(steps + 1) * protocol.step, max=pixels)
    fractions = changed.float() / pixels
    net = loaded.module
    curves: dict[str, list[torch.Tensor]] = {"deletion": [], "insertion": []}
    forwards = {"deletion": 0, "insertion": 0}
    with eval_mode(net), torch.inference_mode():
        blurred = rise_blur(batch, protocol.blur_kernel, protocol.blur_sigma)
        filled = torch.full_like(batch, protocol.deletion_fill)
        for i in range(count):
            target = int(targets[i])
            if clean is None:
                ends = _probabilities(net, torch.stack([filled[i], blurred[i], batch[i]]), target, batch_size)
            else:
                ends = torch.cat([_probabilities(net, torch.stack([filled[i], blurred[i]]), target, batch_size),
                                  clean[i:i + 1].float().cpu()])
            order = torch.argsort(maps[i].flatten().to(batch.device), descending=True, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(pixels, device=order.device)
            rank = rank.view(1, 1, height, width)
            for metric, start, finish, first, last in (
                ("deletion", batch[i], filled[i], ends[2], ends[0]),
                ("insertion", blurred[i], batch[i], ends[1], ends[2]),
            ):
                forwards[metric] += 1
                middle = []
                for part in torch.split(changed[1:-1].to(batch.device), batch_size):
                    keep = rank < part.view(-1, 1, 1, 1)  # pixels already changed at each step
                    copies = torch.where(keep, finish[None], start[None]).contiguous(memory_format=torch.channels_last)
                    middle.append(_probabilities(net, copies, target, batch_size))
                    forwards[metric] += len(part)
                    if progress is not None:
                        progress(len(part))
                curves[metric].append(torch.cat([first[None], *middle, last[None]]))
    deletion, insertion = (
        CausalCurves(metric=metric, fractions=fractions, probability=torch.stack(curves[metric]),
                     auc=trapezoid_auc(fractions, torch.stack(curves[metric])), forwards=forwards[metric])
        for metric in ("deletion", "insertion")
    )
    return deletion, insertion


# ---------------------------------------------------------------- entry point


def quality(
    model: ModelLike,
    images: Any,
    method: str | MapFunction = "gradcam",
    metrics: Sequence[str] = METRICS,
    *,
    target: TargetLike = None,
    layer: str | None = None,
    step: int | None = None,
    deletion_fill: float = 0.0,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    randomization_layers: Sequence[str] | None = None,
    randomization_modes: Sequence[str] = DEFAULT_MODES,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> QualityResult:
    """Score an explanation method: deletion and insertion AUCs and model randomisation.

    Args:
        model: a ``LoadedModel`` or ``nn.Module``.
        images: PIL image(s) or a normalised ``(N, C, H, W)`` tensor.
        method: a registry row ``sanity.attribution_methods`` lists, one of ``BASELINES``, or
            ``fn(loaded, batch, targets, layer, seed) -> (N, H, W)``.
        metrics: any of ``"deletion"``, ``"insertion"``, ``"randomization"``.
        target: ``None`` (each image's top-1), an index or label, or one per image.
        layer: the CAM layer for the CAM methods.
        step: pixels per deletion/insertion step (default ``ceil(H * W / 224)``: RISE's 224 at 224²).
        deletion_fill: deleted pixels' value in the normalised input space.
        blur_kernel, blur_sigma: insertion's starting blur.
        randomization_layers: layers to re-initialise, top down, each its subtree's parameterised
            layers (default ``sanity.cascade_steps``).
        randomization_modes: any of ``sanity.MODES`` (``top-down``, ``bottom-up``,
            ``independent``), run in this order (default: both cascades).
        seed: for the random map and the re-initialisation.
        batch_size: image copies per forward pass.
        progress: called with a count of finished units (copies, or randomisation steps).

    Returns:
        ``QualityResult``.

    Raises:
        UnknownMethod: unknown method name.
        BadArgument: no or an unknown metric, step < 1, even or non-positive blur kernel, a
            ``deletion_fill`` that is not a finite number, no or an unknown randomisation mode.
        BadTarget, UnknownLayer: as the method raises them; ``UnknownLayer`` or ``BadArgument``
            for a randomisation layer that does not exist or has no parameters.
    """
    name, fn = map_function(method)
    for metric in metrics:
        if metric not in METRICS:
            raise BadArgument(f"metric {metric}", "must be one of " + ", ".join(METRICS))
    if step is not None and step < 1:
        raise BadArgument("--step", f"must be at least 1 pixel, got {step}")
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise BadArgument("--blur-kernel", f"must be a positive odd number, got {blur_kernel}")
    if batch_size < 1:
        raise BadArgument("--batch-size", f"must be at least 1, got {batch_size}")
    if isinstance(deletion_fill, bool) or not isinstance(deletion_fill, (int, float)) or not math.isfinite(deletion_fill):
        raise BadArgument(f"--fill {deletion_fill}", "must be a finite number")
    if not metrics:
        raise BadArgument("metrics", "names nothing (choose from " + ", ".join(METRICS) + ")")
    modes = check_modes(randomization_modes) if "randomization" in metrics else ()
    loaded, batch = prepare(model, images)
    height, width = int(batch.shape[-2]), int(batch.shape[-1])
    protocol = Protocol(step=step or math.ceil(height * width / RISE_STEPS), deletion_fill=deletion_fill,
                        blur_kernel=blur_kernel, blur_sigma=blur_sigma)
    with eval_mode(loaded.module), torch.inference_mode():
        logits = torch.cat([loaded.module(part).float() for part in torch.split(batch, batch_size)])
    targets = resolve_targets(target, logits, loaded.categories, loaded.name)
    clean = torch.softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
    maps = fn(loaded, batch, targets, layer, seed).detach().float().cpu()
    if maps.shape != (batch.shape[0], height, width):
        raise ValueError(f"map function {name} returned shape {tuple(maps.shape)}, expected {(batch.shape[0], height, width)}")
    deletion = insertion = None
    if "deletion" in metrics or "insertion" in metrics:
        deletion, insertion = causal_curves(loaded, batch, maps, targets, protocol, clean=clean,
                                            batch_size=batch_size, progress=progress)
    runs = {mode: randomization(loaded, batch, maps, targets, fn, mode=mode, layer=layer,
                                layers=randomization_layers, seed=seed, progress=progress) for mode in modes}
    return QualityResult(
        method=name,
        targets=targets.cpu(),
        labels=target_labels(targets, loaded.categories),
        maps=maps,
        deletion=deletion if "deletion" in metrics else None,
        insertion=insertion if "insertion" in metrics else None,
        randomization=next(iter(runs.values()), None),
        protocol=protocol,
        randomizations=runs,
    )


def explanation_maps(
    model: ModelLike, images: Any, methods: Sequence[str | MapFunction], *, target: TargetLike = None,
    layer: str | None = None, seed: int = 0, batch_size: int = 64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(targets (N,), {name: (N, H, W) map})``: each method's maps for the same classes
    (``target``; ``None``: each image's top-1), as :func:`quality` scores them."""
    loaded, batch = prepare(model, images)
    with eval_mode(loaded.module), torch.inference_mode():
        logits = torch.cat([loaded.module(part).float() for part in torch.split(batch, batch_size)])
    targets = resolve_targets(target, logits, loaded.categories, loaded.name)
    maps = {}
    for method in methods:
        name, fn = map_function(method)
        maps[name] = fn(loaded, batch, targets, layer, seed).detach().float().cpu()
    return targets.cpu(), maps


def beats_random(result: QualityResult, random: QualityResult) -> dict[str, bool]:
    """Per metric: does the method beat the random map on average (lower deletion AUC, higher
    insertion AUC)? Metrics missing from either result are left out."""
    verdict: dict[str, bool] = {}
    if result.deletion is not None and random.deletion is not None:
        verdict["deletion"] = float(result.deletion.auc.mean()) < float(random.deletion.auc.mean())
    if result.insertion is not None and random.insertion is not None:
        verdict["insertion"] = float(result.insertion.auc.mean()) > float(random.insertion.auc.mean())
    return verdict
