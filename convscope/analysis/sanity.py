"""Sanity checks for explanation maps (Adebayo et al., NeurIPS 2018), for every attribution method.

A map that explains the model must change when the model changes. Two tests:

**Model randomisation.** On a copy of the model, the layers are re-initialised and the map is
recomputed for the same class; it is compared with the original map. Three modes:

- ``top-down``: cascading, from the classifier down to the stem, one more step at a time
  (the paper's Fig. 2);
- ``bottom-up``: cascading from the stem up to the classifier (Quantus' recommended order for
  its ``ModelParameterRandomisation``);
- ``independent``: one step at a time, every other layer keeping its trained weights.

The steps are :func:`cascade_steps`: the classifier, then the model's conv stages from the last
to the first, each with the parameterised layers (convolutions, linear layers, norms) it
re-initialises. Each re-initialisation calls the layer's ``reset_parameters`` (and a norm's
``reset_running_stats``) under a generator seeded from ``seed`` (:func:`reinit_seed`, never ``seed``
itself: a model built with ``weights="random", seed=seed`` would draw its own weights again). The
cascades seed it once, before their first step, and every independent step seeds it afresh, so a
cascade's first step re-initialises the same weights as the independent step of that layer. The
caller's model is never touched.

**Data (label) randomisation.** :func:`label_randomization` trains the same architecture twice,
from the same seeded initialisation, for the same steps over the same images: once on the true
labels and once on a seeded permutation of them, and compares the two models' maps
(:func:`compare_models`). A map that survives the loss of every label-image relation explains the
image, not the model.

**Similarity.** Maps are compared as their absolute value (Adebayo et al. show absolute maps; it
is also Quantus' default, ``abs=True``): Spearman rank correlation, SSIM of the maps min-max
scaled to ``[0, 1]`` (Quantus' ``normalise`` then scikit-image's SSIM), and the Pearson
correlation of their HOG features (:func:`hog_features`, the paper's third measure).

**Methods.** Every registry row that takes the image batch and a target class and returns a map
at input resolution (``maps``, or occlusion's ``pixel_drop``) is checked, with its default
options. The deconvnet row projects a layer's strongest channels and explains no class, and its
projection does not depend on the layers above the chosen one (a top-down cascade would leave it
unchanged by construction); it is checked here as captum's ``Deconvolution``: the input gradient
of the explained class's logit with the deconvnet rule at every rectifier, reduced over colours as
saliency is (largest absolute value).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convscope.analysis._features import last_linear
from convscope.errors import BadArgument, UnknownMethod, close_matches
from convscope.methods._common import ModelLike, prepare
from convscope.methods.targets import TargetLike, resolve_targets
from convscope.probes.hooks import eval_mode
from convscope.probes.layers import resolve_layer
from convscope.types import LoadedModel

MODES = ("top-down", "bottom-up", "independent")
# The default: both cascades (the paper's order and Quantus' recommended one). Independent
# randomisation answers another question (which single layer matters) for the same cost again.
DEFAULT_MODES = ("top-down", "bottom-up")
SIMILARITIES = ("spearman", "ssim", "hog")
DECONV = "deconv"

MapFunction = Callable[[LoadedModel, torch.Tensor, torch.Tensor, str | None, int], torch.Tensor]


@dataclass(frozen=True)
class Randomization:
    """Model randomisation of ``N`` maps over ``L`` steps, in one mode.

    Attributes:
        mode: ``"top-down"``, ``"bottom-up"`` or ``"independent"``.
        layers: the steps in the order run: stage aliases, or the classifier's module path.
            In a cascade, point ``k`` has ``layers[:k + 1]`` random; in ``independent`` mode
            only ``layers[k]``.
        modules: per step, the module paths of the parameterised layers it re-initialised
            (without ``kept``).
        kept: modules with parameters but no ``reset_parameters`` in the randomised steps,
            left as they were (ConvNeXt's layer scale).
        spearman: ``(N, L)`` float32 rank correlation of the absolute maps with the original's
            (``nan`` when a map is constant).
        ssim: ``(N, L)`` float32 structural similarity of the absolute maps, each min-max
            scaled to ``[0, 1]`` (7x7 window, scikit-image's default).
        hog: ``(N, L)`` float32 Pearson correlation of the HOG features of the absolute maps
            (``nan`` when a map is constant).
        maps: ``(N, L, H, W)`` float32 the recomputed maps, as the method returns them.
    """

    mode: str
    layers: tuple[str, ...]
    modules: tuple[tuple[str, ...], ...]
    kept: tuple[str, ...]
    spearman: torch.Tensor
    ssim: torch.Tensor
    hog: torch.Tensor
    maps: torch.Tensor

    def randomized(self, step: int) -> tuple[str, ...]:
        """The module paths whose weights are random at point ``step`` (all earlier steps too,
        in a cascade)."""
        chosen = self.modules[step:step + 1] if self.mode == "independent" else self.modules[:step + 1]
        return tuple(chain.from_iterable(chosen))

    def similarity(self, name: str) -> torch.Tensor:
        """``(N, L)`` values of one of ``SIMILARITIES``."""
        return {"spearman": self.spearman, "ssim": self.ssim, "hog": self.hog}[name]


# ---------------------------------------------------------------- methods


def _qualifies(spec: Any) -> bool:
    return bool(spec.takes_images and spec.takes_target)


def attribution_methods() -> tuple[str, ...]:
    """Registry rows the sanity checks can score, in registry order: every row that takes the
    image batch and a target class, and the deconvnet row (see the module docstring)."""
    from convscope.methods.registry import _REGISTRY

    return tuple(name for name, spec in _REGISTRY.items() if _qualifies(spec) or name == DECONV)


def method_aliases() -> dict[str, str]:
    """Old spellings of the scored methods -> their registry names (``gradcam++`` -> ``gradcampp``)."""
    from convscope.methods.registry import get_method

    return {alias: name for name in attribution_methods() for alias in get_method(name).aliases}


def deconvnet_map(loaded: LoadedModel, batch: torch.Tensor, targets: torch.Tensor, layer: str | None, seed: int) -> torch.Tensor:
    """``(N, H, W)``: the input gradient of each target logit under the deconvnet rule (captum's
    ``Deconvolution``), its largest absolute value over colours."""
    from convscope.methods.guided import graph_forward

    with graph_forward(loaded, batch, "deconvnet") as (x, _, _):
        logits = loaded.module(x)
        score = logits.gather(1, targets.to(logits.device)[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad.detach().float().abs().amax(dim=1).cpu()


def _result_map(name: str, result: Any, shape: tuple[int, int, int]) -> torch.Tensor:
    """The map of a registry row's result at input resolution: ``maps``, else ``pixel_drop``."""
    for attribute in ("maps", "pixel_drop"):
        value = getattr(result, attribute, None)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == shape:
            return value
    raise BadArgument(f"method {name}", f"returns no {shape[1]}x{shape[2]} map per image to compare",
                      "sanity checks take methods whose result has maps at input resolution")


def method_map(name: str) -> MapFunction:
    """``fn(loaded, batch, targets, layer, seed) -> (N, H, W)`` for a registry row (or an old
    spelling of one), run with its default options. ``layer`` reaches the rows whose layer is a
    CAM layer (their default is the model's CAM layer) and the rows that require one.

    Raises:
        UnknownMethod: not a row :func:`attribution_methods` lists.
    """
    from convscope.methods.binding import cam_layer
    from convscope.methods.registry import canonical_method_name, get_method

    canonical = canonical_method_name(name)
    known = attribution_methods()
    if canonical not in known:
        raise UnknownMethod(f"method {name}", "is not an attribution method the sanity checks can score",
                            close_matches(name, list(known)) or "choose from " + ", ".join(known))
    if canonical == DECONV:
        return deconvnet_map
    spec = get_method(canonical)
    takes_layer = spec.layer == "required" or (
        spec.layer == "optional" and spec.cli is not None and spec.cli.default_layer is cam_layer)

    def run(loaded: LoadedModel, batch: torch.Tensor, targets: torch.Tensor, layer: str | None, seed: int) -> torch.Tensor:
        result = spec.run(loaded, batch, target=targets, layer=layer if takes_layer else None)
        return _result_map(canonical, result, (int(batch.shape[0]), int(batch.shape[-2]), int(batch.shape[-1])))

    run.__name__ = canonical
    return run


# ---------------------------------------------------------------- similarity


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` of a 1-D tensor, ties sharing their average rank (as scipy's rankdata - 1)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() + 1) / 2
    result = torch.empty(len(values), dtype=torch.float64)
    result[order] = average[inverse]
    return result


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' values (``nan`` if either is constant)."""
    x, y = a.flatten().double(), b.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps (``nan`` if either is constant)."""
    return pearson(ranks(a.flatten().double()), ranks(b.flatten().double()))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Structural similarity of two ``(H, W)`` maps in ``[0, 1]`` (data range 1), with
    scikit-image's defaults: a ``window x window`` uniform filter, sample covariances, the mean
    over positions whose window fits inside the map."""
    x, y = a.double()[None, None], b.double()[None, None]
    n = window * window

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mx, my = mean(x), mean(y)
    correction = n / (n - 1)
    vx = (mean(x * x) - mx * mx) * correction
    vy = (mean(y * y) - my * my) * correction
    cxy = (mean(x * y) - mx * my) * correction
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def unit(values: torch.Tensor) -> torch.Tensor:
    """Min-max scaled to ``[0, 1]`` (a constant map becomes zeros)."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


HOG_ORIENTATIONS = 9
HOG_CELL = 8
HOG_BLOCK = 3
HOG_EPS = 1e-5


def hog_features(maps: torch.Tensor, *, orientations: int = HOG_ORIENTATIONS, cell: int = HOG_CELL,
                 block: int = HOG_BLOCK) -> torch.Tensor:
    """``(B, F)`` float64 histogram-of-oriented-gradients features of ``(B, H, W)`` maps, with
    scikit-image's ``hog`` defaults (Dalal & Triggs): central-difference gradients (zero on the
    border rows and columns), unsigned orientations in ``orientations`` equal bins over
    ``[0, 180)`` degrees, each pixel's magnitude added to its bin, averaged over ``cell x cell``
    cells (the rows and columns past the last whole cell ignored), and ``block x block`` cell
    blocks L2-Hys normalised (clipped at 0.2). ``F`` is ordered as scikit-image's feature vector.

    A map with fewer than ``block`` whole cells on a side uses cells of ``side // block`` pixels
    (at least 1), so small inputs (28x28 MNIST) still give a block.
    """
    images = maps.double()
    count, height, width = images.shape
    cell = max(1, min(cell, min(height, width) // block))
    g_row = torch.zeros_like(images)
    g_col = torch.zeros_like(images)
    g_row[:, 1:-1, :] = images[:, 2:, :] - images[:, :-2, :]
    g_col[:, :, 1:-1] = images[:, :, 2:] - images[:, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    # An angle that rounds to 180.0 falls in no bin (as in scikit-image): index ``orientations`` is dropped.
    index = torch.clamp(torch.floor(angle / (180.0 / orientations)).long(), 0, orientations)
    rows, cols = height // cell, width // cell
    votes = torch.zeros(count, orientations + 1, height, width, dtype=torch.float64)
    votes.scatter_(1, index[:, None], magnitude[:, None])
    votes = votes[:, :orientations, :rows * cell, :cols * cell]
    histogram = F.avg_pool2d(votes, cell)  # (B, O, rows, cols): the mean magnitude per bin and cell
    blocks = histogram.unfold(2, block, 1).unfold(3, block, 1)  # (B, O, br, bc, block, block)
    blocks = blocks.permute(0, 2, 3, 4, 5, 1).reshape(count, rows - block + 1, cols - block + 1, -1)
    blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + HOG_EPS**2)
    blocks = torch.clamp(blocks, max=0.2)
    blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + HOG_EPS**2)
    return blocks.reshape(count, -1)


def hog_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the HOG features of two ``(H, W)`` maps (Adebayo et al.)."""
    features = hog_features(torch.stack([a, b]))
    return pearson(features[0], features[1])


def comparable(maps: torch.Tensor) -> torch.Tensor:
    """What is compared: the absolute map, float64 on the CPU."""
    return maps.detach().double().cpu().abs()


def similarities(reference: torch.Tensor, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each of ``SIMILARITIES`` between ``(N, H, W)`` reference maps and ``(N, L, H, W)`` maps,
    as ``(N, L)`` float32, on the absolute maps (SSIM and HOG on them min-max scaled)."""
    count, steps = int(maps.shape[0]), int(maps.shape[1])
    ref, other = comparable(reference), comparable(maps)
    ref_unit = torch.stack([unit(m) for m in ref])
    other_unit = torch.stack([unit(m) for m in other.flatten(0, 1)]).view_as(other)
    ref_hog = hog_features(ref_unit)
    other_hog = hog_features(other_unit.flatten(0, 1)).view(count, steps, -1)
    table = {
        "spearman": [[spearman(ref[i], other[i, k]) for k in range(steps)] for i in range(count)],
        "ssim": [[ssim(ref_unit[i], other_unit[i, k]) for k in range(steps)] for i in range(count)],
        "hog": [[pearson(ref_hog[i], other_hog[i, k]) for k in range(steps)] for i in range(count)],
    }
    return {name: torch.tensor(values, dtype=torch.float32).view(count, steps) for name, values in table.items()}


# ---------------------------------------------------------------- model randomisation


def _parameterised(module: nn.Module) -> bool:
    """A layer with parameters of its own (a conv, a linear layer, a norm's affine), or a norm's
    running statistics."""
    return next(module.parameters(recurse=False), None) is not None or getattr(module, "running_mean", None) is not None


def cascade_steps(loaded: LoadedModel, layers: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The steps, top down: step name -> module paths of the parameterised layers it re-initialises.

    Default steps: the classifier (every parameterised layer registered after the last stage,
    named by the last ``nn.Linear``), then each stage from the last: the parameterised layers
    registered after the previous stage's subtree up to the end of this stage's subtree (for a
    block stage, its own layers; for an activation stage, its convolution and norm). Steps with
    nothing to re-initialise are dropped. Named ``layers`` re-initialise the parameterised layers
    of their own subtree, in the order given (read as top down).

    Raises:
        UnknownLayer: a named layer does not exist.
        BadArgument: a named layer has no parameterised layer (a parameter-free activation).
    """
    named = list(loaded.module.named_modules())
    position = {path: k for k, (path, _) in enumerate(named)}

    def subtree_end(path: str) -> int:
        """Index of the last module registered inside ``path`` (``path`` itself when a leaf)."""
        prefix = f"{path}." if path else ""
        end = position[path]
        while end + 1 < len(named) and named[end + 1][0].startswith(prefix):
            end += 1
        return end

    def params_in(start: int, stop: int) -> list[str]:
        return [path for path, sub in named[start:stop + 1] if _parameterised(sub)]

    if layers:
        steps: dict[str, list[str]] = {}
        for name in layers:
            path, _ = resolve_layer(loaded, name)
            found = params_in(position[path], subtree_end(path))
            if not found:
                raise BadArgument(f"randomization layer {name}", f"({path}) has no parameters to re-initialise",
                                  "name its convolution or the block holding it")
            steps[name] = found
        return steps
    stages: list[tuple[str, int]] = []  # (alias, end of its subtree) in registration order
    for alias, path in loaded.stages.items():
        if path in position:
            stages.append((alias, subtree_end(path)))
    stages.sort(key=lambda item: item[1])
    bottom: dict[str, list[str]] = {}
    previous = -1
    for alias, end in stages:
        if end > previous:
            bottom[alias] = params_in(previous + 1, end)
            previous = end
    steps = {}
    if any(isinstance(m, nn.Linear) for _, m in named):
        classifier = {id(m): n for n, m in named}[id(last_linear(loaded.module, loaded.name))]
        head = params_in(previous + 1, len(named) - 1) or [classifier]
        steps[classifier] = head
    for alias in reversed(list(bottom)):
        if bottom[alias]:
            steps[alias] = bottom[alias]
    return steps


def _reinitialise(module: nn.Module) -> bool:
    """Re-initialise one layer's own parameters (and a norm's running statistics); ``False``
    when the module has parameters but no ``reset_parameters``."""
    reset = getattr(module, "reset_parameters", None)
    running = getattr(module, "reset_running_stats", None)
    if callable(running):
        running()
    if callable(reset):
        reset()
        return True
    return False


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a module's own parameters and buffers (not its children's)."""
    own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
    return {name: value.detach().clone() for name, value in own}


def _restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in state.items():
            getattr(module, name).copy_(value)


def reinit_seed(seed: int) -> int:
    """The seed of the re-initialisations for a run seeded ``seed``: a fixed mix of it, so that it
    differs from the seed a seeded random model was built with."""
    return (seed * 0x9E3779B97F4A7C15 + 0x5A17C0DE) % 2**63


def check_modes(modes: Sequence[str], subject: str = "randomization modes") -> tuple[str, ...]:
    """``modes`` as a tuple, each one of ``MODES`` and at least one."""
    if not modes:
        raise BadArgument(subject, "names nothing (choose from " + ", ".join(MODES) + ")")
    for mode in modes:
        if mode not in MODES:
            raise BadArgument(f"randomization mode {mode}", "must be one of " + ", ".join(MODES))
    return tuple(modes)


def randomization(
    loaded: LoadedModel, batch: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, fn: MapFunction,
    *, mode: str = "top-down", layer: str | None = None, layers: Sequence[str] | None = None, seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Randomization:
    """Re-initialise the steps of :func:`cascade_steps` (``layers``: named ones, top down) on a
    copy of the model in ``mode``'s order, recompute the map after each step with ``fn`` for the
    same ``targets``, and compare it with ``maps`` (the original ``(N, H, W)`` maps).

    ``progress`` is called with 1 after each step.

    Raises:
        BadArgument: an unknown mode; see :func:`cascade_steps` for ``layers``.
    """
    check_modes((mode,))
    steps = cascade_steps(loaded, layers)
    order = list(reversed(steps)) if mode == "bottom-up" else list(steps)
    twin_module = copy.deepcopy(loaded.module)
    twin = dataclasses.replace(loaded, module=twin_module)
    twin_modules = dict(twin_module.named_modules())
    recomputed: list[torch.Tensor] = []
    kept: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(reinit_seed(seed))
        for name in order:
            saved = {path: _own_state(twin_modules[path]) for path in steps[name]} if mode == "independent" else {}
            if mode == "independent":
                torch.manual_seed(reinit_seed(seed))
            for path in steps[name]:
                if not _reinitialise(twin_modules[path]) and path not in kept:
                    kept.append(path)
            recomputed.append(fn(twin, batch, targets, layer, seed).detach().float().cpu())
            for path, state in saved.items():
                _restore(twin_modules[path], state)
            if progress is not None:
                progress(1)
    stacked = torch.stack(recomputed, dim=1)  # (N, L, H, W)
    scores = similarities(maps, stacked)
    return Randomization(mode=mode, layers=tuple(order),
                         modules=tuple(tuple(p for p in steps[name] if p not in kept) for name in order),
                         kept=tuple(kept), spearman=scores["spearman"], ssim=scores["ssim"], hog=scores["hog"],
                         maps=stacked)


def sanity_check(
    model: ModelLike, images: Any, method: str | MapFunction, *, modes: Sequence[str] = DEFAULT_MODES,
    target: TargetLike = None, layer: str | None = None, layers: Sequence[str] | None = None, seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Randomization]]:
    """Model randomisation of one method in each of ``modes``.

    Args:
        model: a ``LoadedModel`` or ``nn.Module``.
        images: PIL image(s) or a normalised ``(N, C, H, W)`` tensor.
        method: a name from :func:`attribution_methods` (or an old spelling), or
            ``fn(loaded, batch, targets, layer, seed) -> (N, H, W)``.
        target: ``None`` (each image's top-1 on the trained model), an index or label, or one per image.
        layer: the CAM layer of the CAM methods.
        layers: the steps to re-initialise (default :func:`cascade_steps`).

    Returns:
        ``(maps, {mode: Randomization})``: the original ``(N, H, W)`` maps and each mode's run.
    """
    modes = check_modes(modes)
    fn = method if callable(method) else method_map(method)
    loaded, batch = prepare(model, images)
    with eval_mode(loaded.module), torch.inference_mode():
        logits = loaded.module(batch).float()
    targets = resolve_targets(target, logits, loaded.categories, loaded.name)
    maps = fn(loaded, batch, targets, layer, seed).detach().float().cpu()
    runs = {mode: randomization(loaded, batch, maps, targets, fn, mode=mode, layer=layer, layers=layers, seed=seed,
                                progress=progress) for mode in modes}
    return maps, runs


# ---------------------------------------------------------------- label randomisation


@dataclass(frozen=True)
class ModelComparison:
    """The maps of two models on the same images and classes, per method.

    Attributes:
        targets: ``(N,)`` int64 explained classes (the same for both models).
        maps: method -> ``(N, 2, H, W)`` float32: the reference model's map, then the other's.
        spearman, ssim, hog: method -> ``(N,)`` float32 similarity of the two absolute maps.
    """

    targets: torch.Tensor
    maps: dict[str, torch.Tensor]
    spearman: dict[str, torch.Tensor]
    ssim: dict[str, torch.Tensor]
    hog: dict[str, torch.Tensor]

    def similarity(self, name: str) -> dict[str, torch.Tensor]:
        """method -> ``(N,)`` values of one of ``SIMILARITIES``."""
        return {"spearman": self.spearman, "ssim": self.ssim, "hog": self.hog}[name]


def compare_models(
    reference: LoadedModel, other: LoadedModel, images: Any, methods: Sequence[str | MapFunction],
    *, target: TargetLike = None, layer: str | None = None, seed: int = 0,
) -> ModelComparison:
    """Each method's map on ``reference`` and on ``other`` (same architecture and input), for the
    same classes (``target``; ``None``: the reference model's top-1), compared as in the
    randomisation test."""
    loaded, batch = prepare(reference, images)
    with eval_mode(loaded.module), torch.inference_mode():
        logits = loaded.module(batch).float()
    targets = resolve_targets(target, logits, loaded.categories, loaded.name)
    maps: dict[str, torch.Tensor] = {}
    scores: dict[str, dict[str, torch.Tensor]] = {name: {} for name in SIMILARITIES}
    for method in methods:
        fn = method if callable(method) else method_map(method)
        name = getattr(fn, "__name__", "custom")
        pair = [fn(model, batch.to(model.device), targets, layer, seed).detach().float().cpu() for model in (loaded, other)]
        maps[name] = torch.stack(pair, dim=1)
        for key, values in similarities(pair[0], pair[1][:, None]).items():
            scores[key][name] = values[:, 0]
    return ModelComparison(targets=targets.cpu(), maps=maps, spearman=scores["spearman"], ssim=scores["ssim"],
                           hog=scores["hog"])


@dataclass(frozen=True)
class LabelRandomization:
    """Adebayo et al.'s data randomisation test: one architecture trained on true and on permuted labels.

    Attributes:
        arch, data: what was trained, on what.
        steps: optimizer steps of each run (the same for both: the same images, batch size and
            epochs; a last partial batch is dropped).
        shuffled_fraction: fraction of training labels the permutation changed.
        train_accuracy: ``{"true": ..., "shuffled": ...}`` each model's accuracy on its own
            training labels at the end.
        test_accuracy: ``{"true": ..., "shuffled": ...}`` each model's accuracy on the test
            images' true labels (the permuted-label model near chance).
        comparison: the maps of both models on the test images (``true`` is the reference).
        runs: the two run folders (``true``, ``shuffled``), when kept.
    """

    arch: str
    data: str
    steps: int
    shuffled_fraction: float
    train_accuracy: dict[str, float]
    test_accuracy: dict[str, float]
    comparison: ModelComparison
    runs: dict[str, str]


def _write_class_folders(root: Path, images: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
    """``root/cNN/i.png`` per image (grey or RGB uint8), one sub-folder per class, all present."""
    import numpy as np
    from PIL import Image

    width = len(str(classes - 1))
    for label in range(classes):
        (root / f"c{label:0{width}d}").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        pixels = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels.astype(np.uint8))
        picture.save(root / f"c{label:0{width}d}" / f"{i:06d}.png")


LABEL_RUN_FOLDERS = ("true-data", "true", "shuffled-data", "shuffled")


@contextmanager
def _work_folder(path: str | os.PathLike[str] | None) -> Iterator[Path]:
    """The folder of the two training runs: a temporary one, or ``path``, where the four folders
    it writes (``LABEL_RUN_FOLDERS``) must not exist yet: nothing already there is replaced."""
    if path is not None:
        folder = Path(path)
        taken = [name for name in LABEL_RUN_FOLDERS if os.path.lexists(folder / name)]
        if taken:
            raise BadArgument(f"workdir {folder}", f"already holds {taken[0]}; nothing there is replaced",
                              "give a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="convscope-labels-") as temporary:
        yield Path(temporary)


def _accuracy(loaded: LoadedModel, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``loaded`` on uint8 ``(N, C, h, w)`` pixels (converted as the training data is)."""
    batch = _normalised(loaded, pixels)
    with eval_mode(loaded.module), torch.inference_mode():
        predicted = torch.cat([loaded.module(part).argmax(dim=1).cpu() for part in torch.split(batch, batch_size)])
    return float((predicted == labels).double().mean())


def _normalised(loaded: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, h, w)`` dataset pixels -> the model's normalised input (as evaluation converts them)."""
    from convscope.training.batches import BatchTransform

    return BatchTransform(loaded.preprocess)(pixels).to(loaded.device)


def label_randomization(
    arch: str = "zfnet_mnist", data: str = "fashion-mnist", methods: Sequence[str | MapFunction] = ("saliency",), *,
    limit: int = 1024, epochs: int = 3, batch_size: int = 64, images: int = 8, seed: int = 0,
    workdir: str | os.PathLike[str] | None = None, layer: str | None = None,
) -> LabelRandomization:
    """Train ``arch`` on ``data``'s true labels and on a seeded permutation of them, for the
    same steps from the same initialisation and data order, and compare the two models' maps on
    ``images`` test images (classes: the true-label model's top-1).

    Both runs go through :func:`convscope.training.train` on the same ``limit`` training images
    written as class folders (``workdir/true``, ``workdir/shuffled``; a temporary folder unless
    ``workdir`` is given), with no validation split, so each keeps its last epoch.

    Raises:
        BadArgument: ``limit``, ``epochs``, ``batch_size`` or ``images`` below 1 (``limit`` below 2).
        DataError: the dataset is missing.
    """
    from convscope.models.load import load_model
    from convscope.training.config import TrainConfig
    from convscope.training.data import load_training_data
    from convscope.training.loop import train

    for option, value, least in (("limit", limit, 2), ("epochs", epochs, 1), ("batch_size", batch_size, 1),
                                 ("images", images, 1)):
        if value < least:
            raise BadArgument(f"{option} {value}", f"must be at least {least}")
    template = load_model(arch, weights="random", seed=seed)
    dataset = load_training_data(data, preprocess=template.preprocess, val_split=0.0, limit=limit, split_seed=seed)
    classes = len(dataset.categories)
    true_labels = dataset.train.labels
    permutation = torch.randperm(len(true_labels), generator=torch.Generator().manual_seed(seed))
    shuffled_labels = true_labels[permutation]
    test = dataset.test if dataset.test is not None else dataset.train
    with _work_folder(workdir) as root:
        models: dict[str, LoadedModel] = {}
        for kind, labels in (("true", true_labels), ("shuffled", shuffled_labels)):
            _write_class_folders(root / f"{kind}-data", dataset.train.images, labels, classes)
            config = TrainConfig(data=str(root / f"{kind}-data"), out_dir=str(root / kind), arch=arch, epochs=epochs,
                                 batch_size=batch_size, seed=seed, val_split=0.0)
            train(config, overwrite=True)
            models[kind] = load_model(arch, weights=str(root / kind / "best.pt"))
        reference, other = models["true"], models["shuffled"]
        count = min(images, len(test))
        batch = _normalised(reference, test.images[:count])
        comparison = compare_models(reference, other, batch, methods, layer=layer, seed=seed)
        train_accuracy = {"true": _accuracy(reference, dataset.train.images, true_labels),
                          "shuffled": _accuracy(other, dataset.train.images, shuffled_labels)}
        test_accuracy = {kind: _accuracy(models[kind], test.images, test.labels) for kind in models}
        runs = {kind: str(root / kind) for kind in models} if workdir is not None else {}
    return LabelRandomization(
        arch=arch, data=data, steps=epochs * max(1, len(true_labels) // batch_size),
        shuffled_fraction=float((shuffled_labels != true_labels).double().mean()),
        train_accuracy=train_accuracy, test_accuracy=test_accuracy, comparison=comparison, runs=runs,
    )
