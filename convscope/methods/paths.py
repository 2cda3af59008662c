"""Integrated Gradients (Sundararajan et al., ICML 2017) and SmoothGrad (Smilkov et al., 2017).

Both average input gradients over many copies of the photo.

* **Integrated Gradients** walks the straight line from a baseline ``b`` to the photo ``x`` and
  integrates the gradient of the class score along it, then multiplies by ``x - b``:
  ``IG(x) = (x - b) * integral_0^1 grad F(b + a (x - b)) da``. The integral is a quadrature
  ``sum_k w_k grad F(b + a_k (x - b))`` with captum's points ``a_k`` and weights ``w_k``
  (Gauss-Legendre, or left/right/middle/trapezoid Riemann sums), so the attributions agree with
  captum's ``IntegratedGradients`` to float rounding. By the fundamental theorem of calculus the
  attributions add up to ``F(x) - F(b)``; what the quadrature misses is the *completeness
  error*, reported per image. It falls as ``steps`` grows.
* **SmoothGrad** averages a base attribution over ``samples`` noisy copies ``x + sigma * eps``,
  ``eps`` standard normal, with ``sigma = noise * (max(x) - min(x))`` per image: the paper's
  noise level, a fraction of the input's range (what captum's ``NoiseTunnel(stdevs=...)`` is
  given). The base is the signed input gradient (captum ``Saliency(abs=False)``; note that
  captum's ``Saliency`` takes the absolute value by default), guided backprop, or Integrated
  Gradients with its defaults (50 Gauss-Legendre steps from the zero baseline) per noisy copy.

How it runs: every (image, step) or (image, sample, step) pair is a *point*; the points go
through the network in chunks, each chunk one forward and one backward pass (no Python loop
over steps or samples). The backward pass is seeded with the quadrature weights, so it returns
``w_k * grad`` directly, and the chunk's gradients are summed per image with ``index_add_``.
The chunk size comes from the network's activation memory per image (``CHUNK_BYTES`` of
activations per chunk). Gradients come from ``torch.autograd.grad`` (no ``.grad`` is written),
the network runs in eval mode and is left as it was found.

Noise is drawn per sample from ``numpy.random.default_rng((seed, sample))``: sample ``s`` of
every image uses the same standard-normal draw, scaled by that image's ``sigma``. A photo
therefore gets the same SmoothGrad map alone or in a batch, and in any chunking, on the CPU.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from numbers import Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import BadArgument, BadInput, BadInputType, close_matches
from convscope.methods._common import ModelLike, prepare
from convscope.methods.guided import class_scores, rule_warnings
from convscope.methods.registry import IG_METHODS, SMOOTHGRAD_BASES
from convscope.methods.results import Attributions
from convscope.methods.targets import TargetLike, target_labels
from convscope.probes.geometry import trace
from convscope.probes.gradfold import input_gradient_copy
from convscope.probes.hooks import eval_mode
from convscope.probes.layout import network_memory_format
from convscope.probes.relu_rules import RuleState, relu_rule
from convscope.runtime import allocator_tuned
from convscope.types import LoadedModel
from convscope.validate import describe

MAX_STEPS = 4096
MAX_SAMPLES = 4096
# Forward and backward passes one image may ask for (steps x samples for SmoothGrad of IG):
# about an hour for the default model on two CPU cores.
MAX_POINTS_PER_IMAGE = 1 << 16
# Activation memory one chunk of points may hold: a point keeps about its forward activations
# for the backward pass, so a chunk is CHUNK_BYTES / (one image's layer outputs) points, split
# evenly over the path. Measured on EfficientNet-Lite0 at 224 px (88 MB of layer outputs per
# image; allocator tuned, one thread, 50 steps): 66 MB of peak memory per point; chunks of 10,
# 17, 25 and 50 points took 1.64, 1.18, 1.08 and 1.23 s.
CHUNK_BYTES = 2 << 30
# SmoothGrad of Integrated Gradients runs IG with its defaults on each noisy copy.
SMOOTHGRAD_IG_STEPS = 50
SMOOTHGRAD_IG_METHOD = "gausslegendre"
# The "blur" baseline: a Gaussian blur with sigma = BLUR_SIGMA x the shorter side of the input
# (14 pixels at 224), kernel radius ceil(3 sigma), reflected borders: only the broad colours
# of the photo are left.
BLUR_SIGMA = 1 / 16
# A completeness error above this fraction of |F(x) - F(b)| gets a warning line.
COMPLETENESS_WARNING = 0.05

# module -> {(C, H, W, dtype): activation bytes of one image}; weak, so a model is not kept alive
_ACTIVATIONS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- quadrature and baselines


def quadrature(method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``a_k`` in ``[0, 1]`` and weights ``w_k`` of the path integral, as captum's
    ``approximation_methods`` gives them.

    Gauss-Legendre nodes and weights come from numpy (float64, mapped from ``[-1, 1]`` to
    ``[0, 1]``); the Riemann points are float32 ``linspace`` values, built as captum builds them,
    so the interpolated inputs agree bit for bit. Riemann weights are ``1/steps``, halved at both
    ends for the trapezoid rule; as in captum, its points are ``1/(steps - 1)`` apart while its
    weights sum to ``1 - 1/steps``, so its completeness error shrinks only like ``1/steps``.

    Returns:
        ``(alphas, weights)``, each ``(steps,)`` float64.

    Raises:
        BadArgument: an unknown method, or fewer steps than the method needs (one for
            Gauss-Legendre, two for the Riemann sums, as in captum).
    """
    _check_method(method)
    _check_steps(steps, method)
    if method == "gausslegendre":
        nodes, sizes = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1.0) / 2.0), torch.from_numpy(sizes / 2.0)
    n = steps
    ends = {"riemann_left": (0.0, 1 - 1 / n), "riemann_right": (1 / n, 1.0),
            "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)), "riemann_trapezoid": (0.0, 1.0)}[method]
    alphas = torch.linspace(*ends, n, dtype=torch.float32).double()
    weights = torch.full((n,), 1 / n, dtype=torch.float64)
    if method == "riemann_trapezoid":
        weights[[0, -1]] /= 2
    return alphas, weights


def blurred(batch: torch.Tensor) -> torch.Tensor:
    """The "blur" baseline: each image under a Gaussian blur of ``sigma = BLUR_SIGMA x`` its
    shorter side, kernel ``2 ceil(3 sigma) + 1`` wide (at most the image), reflected borders.

    Blurring is linear with weights summing to one, so blurring the normalised input equals
    normalising the blurred pixels. Same kernel as torchvision's ``gaussian_blur`` with that size
    and sigma; applied as two 1-D passes.
    """
    channels, height, width = batch.shape[1:]
    sigma = BLUR_SIGMA * min(height, width)
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    if radius < 1:
        return batch.clone()
    offsets = torch.linspace(-radius, radius, 2 * radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=batch.device, dtype=batch.dtype)
    padded = F.pad(batch, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(), groups=channels)


def baseline_batch(loaded: LoadedModel, batch: torch.Tensor, baseline: Any) -> tuple[torch.Tensor, Any]:
    """The baseline of each image, ``(N, C, H, W)`` like ``batch``, and its JSON description.

    Args:
        baseline: a number (every input value, in the normalised input space: 0 is the
            dataset's mean colour), a tensor of shape ``()``, ``(C, H, W)``, ``(1, C, H, W)`` or
            ``(N, C, H, W)`` in that space (captum's ``baselines``), ``"black"`` (pixel value 0
            normalised with the model's mean and std) or ``"blur"`` (see :func:`blurred`).

    Raises:
        BadArgument: an unknown name, or a number that is not finite.
        BadInput: a tensor of another shape, or with NaN or infinite values.
        BadInputType: anything else (a bool, a list, ``None``).
    """
    if isinstance(baseline, str):
        if baseline == "black":
            mean = torch.tensor(loaded.preprocess.mean, dtype=torch.float64)
            std = torch.tensor(loaded.preprocess.std, dtype=torch.float64)
            if mean.numel() != batch.shape[1]:
                raise BadArgument("baseline black", f"needs the model's mean and std per channel; the preprocessing "
                                  f"has {mean.numel()} for a {batch.shape[1]}-channel input", "give a number instead")
            black = (-mean / std).to(device=batch.device, dtype=batch.dtype)
            return black.view(1, -1, 1, 1).expand_as(batch).contiguous(), "black"
        if baseline == "blur":
            return blurred(batch), "blur"
        raise BadArgument(f"baseline {baseline!r}", "is not black, blur or a number",
                          close_matches(baseline, ("black", "blur")))
    if isinstance(baseline, bool) or not isinstance(baseline, (Real, torch.Tensor)):
        raise BadInputType("baseline", f"expected a number, a tensor, 'black' or 'blur', got {describe(baseline)}")
    if isinstance(baseline, Real):
        value = float(baseline)
        if not math.isfinite(value):
            raise BadArgument(f"baseline {baseline}", "must be a finite number")
        return torch.full_like(batch, value), value
    shape = tuple(baseline.shape)
    if not baseline.is_floating_point():
        raise BadInputType("baseline", f"must be a floating-point tensor, got {baseline.dtype}")
    if shape not in ((), batch.shape[1:], (1, *batch.shape[1:]), tuple(batch.shape)):
        raise BadInput("baseline", f"has shape {shape}; expected (), {tuple(batch.shape[1:])}, "
                       f"(1, {', '.join(map(str, batch.shape[1:]))}) or {tuple(batch.shape)}")
    if not bool(torch.isfinite(baseline).all()):
        raise BadInput("baseline", "has NaN or infinite values")
    tensor = baseline.detach().to(device=batch.device, dtype=batch.dtype)
    return tensor.expand_as(batch).contiguous(), f"tensor {list(shape)}"


def smoothgrad_noise(sample: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard-normal noise of noisy copy ``sample``: ``(C, H, W)`` float32, the same for
    every image (each image scales it by its own ``sigma``) and for any chunking."""
    generator = np.random.default_rng((seed, sample))
    return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32))


def noise_scales(batch: torch.Tensor, noise: float) -> torch.Tensor:
    """``(N,)`` noise standard deviation per image: ``noise x (max - min)`` of its input values."""
    flat = batch.flatten(1)
    return noise * (flat.amax(dim=1) - flat.amin(dim=1))


# ---------------------------------------------------------------- argument checks


def _check_method(method: Any) -> None:
    if not isinstance(method, str) or method not in IG_METHODS:
        raise BadArgument(f"method {method!r}", "is not an integration method",
                          close_matches(str(method), IG_METHODS))


def _check_count(value: Any, name: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadInputType(name, f"must be a whole number, got {describe(value)}")
    if not minimum <= int(value) <= maximum:
        raise BadArgument(f"{name} {value}", f"must be between {minimum} and {maximum}")
    return int(value)


def _check_steps(steps: Any, method: str) -> int:
    least = 1 if method == "gausslegendre" else 2
    count = _check_count(steps, "steps", 1, MAX_STEPS)
    if count < least:
        raise BadArgument(f"steps {count}", f"must be at least {least} for {method}",
                          "a Riemann sum needs two points" if least == 2 else None)
    return count


def _check_noise(noise: Any) -> float:
    if isinstance(noise, bool) or not isinstance(noise, Real) or not math.isfinite(float(noise)):
        raise BadArgument(f"noise {noise!r}", "must be a finite number")
    if not 0.0 <= float(noise) <= 10.0:
        raise BadArgument(f"noise {noise}", "must be between 0 and 10 (a fraction of the input's range)")
    return float(noise)


# ---------------------------------------------------------------- the engine


@contextmanager
def _differentiable(loaded: LoadedModel, rule: str | None) -> Iterator[RuleState | None]:
    """Eval mode, grad enabled and the optional rectifier rule, for a whole run of chunks
    (``graph_forward`` is the one-pass version); yields the rule's state."""
    with ExitStack() as stack:
        if any(m.training for m in loaded.module.modules()):
            stack.enter_context(eval_mode(loaded.module))
        stack.enter_context(torch.enable_grad())
        yield stack.enter_context(relu_rule(loaded.module, rule)) if rule else None


def _chunk_size(loaded: LoadedModel, batch: torch.Tensor) -> int:
    """Points per forward/backward pass at most: ``CHUNK_BYTES`` over one image's activations
    (the input and every layer output, measured by one traced pass at the batch's size)."""
    key = (*batch.shape[1:], batch.dtype, batch.device)
    known = _ACTIVATIONS.setdefault(loaded.module, {})
    if key not in known:
        with torch.no_grad():
            calls = trace(loaded.module, batch[:1])
        known[key] = batch[:1].numel() * batch.element_size() + sum(call.output_bytes for call in calls)
    return max(1, CHUNK_BYTES // max(known[key], 1))


def _logits(loaded: LoadedModel, batch: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits of ``batch`` without a graph, ``chunk`` images at a time."""
    with torch.no_grad():
        return torch.cat([loaded.module(part) for part in torch.split(batch, chunk)])


def _gradient_network(loaded: LoadedModel, batch: torch.Tensor) -> nn.Module:
    """The network input gradients run through: the copy with each BatchNorm's backward merged
    into its convolution (``probes.gradfold``: the same forward, one backward pass fewer per
    map, gradients equal to rounding)."""
    return input_gradient_copy(loaded.module, batch)


def _path_sums(
    loaded: LoadedModel, like: torch.Tensor, targets: torch.Tensor, groups: int, ends: Callable[[int, int], torch.Tensor],
    starts: Callable[[int, int], torch.Tensor] | None, alphas: torch.Tensor, weights: torch.Tensor,
    finish: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None], chunk: int,
    network: nn.Module | None = None,
) -> None:
    """Sum ``w_k grad F(point)`` over the ``K`` points of each of ``groups`` groups, chunk by chunk.

    Group ``g`` runs from ``starts(g)`` to ``ends(g)`` (``starts is None``: the point is the end
    point itself, ``K == 1``); point ``k`` is ``start + a_k (end - start)``, and ``F`` the logit
    of ``targets[g]``; points are on ``like``'s device and dtype. ``ends(g0, g1)`` / ``starts(g0, g1)`` give the groups ``g0 <= g < g1``.
    When every point of a group is done, ``finish(g0, sums, ends, starts)`` receives a run of
    finished groups from ``g0`` on; a group split across two chunks is carried over.
    ``network`` (default ``loaded.module``) is what the points run through; points are laid
    out channels-last when its convolutions are (no layout copy at the first layer).
    """
    network = loaded.module if network is None else network
    layout = network_memory_format(network)
    total = groups * alphas.numel()
    chunk = math.ceil(total / math.ceil(total / chunk))  # even chunks: no small tail pass
    per_group = alphas.numel()
    device, dtype = like.device, like.dtype
    alphas, weights = alphas.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype)
    carried: torch.Tensor | None = None
    for first in range(0, total, chunk):
        points_at = torch.arange(first, min(first + chunk, total), device=device)
        group_of, step_of = points_at // per_group, points_at % per_group
        g0, g1 = int(group_of[0]), int(group_of[-1]) + 1
        end = ends(g0, g1)
        start = starts(g0, g1) if starts is not None else None
        local = group_of - g0
        if start is None:
            points = end[local]
        else:
            points = start[local] + alphas[step_of].view(-1, 1, 1, 1) * (end - start)[local]
        points = points.contiguous(memory_format=layout).requires_grad_(True)
        scores = network(points).gather(1, targets[group_of][:, None])[:, 0]
        (grads,) = torch.autograd.grad(scores, points, grad_outputs=weights[step_of].to(scores.dtype))
        sums = torch.zeros_like(end).index_add_(0, local, grads.detach())
        if carried is not None:
            sums[0] += carried
            carried = None
        done = min(g1, (first + len(points_at)) // per_group)  # groups before it have all their points
        if done > g0:
            finish(g0, sums[: done - g0], end[: done - g0], None if start is None else start[: done - g0])
        if done < g1:
            carried = sums[-1]


# ---------------------------------------------------------------- the methods


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def integrated_gradients(
    model: ModelLike,
    images: Any,
    target: TargetLike = None,
    *,
    steps: int = 50,
    method: str = "gausslegendre",
    baseline: float | str | torch.Tensor = 0.0,
) -> Attributions:
    """Integrated Gradients: the class score's gradient integrated from ``baseline`` to the
    input, times ``input - baseline`` (captum's ``IntegratedGradients``).

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` returning ``(N, classes)`` scores.
        images: PIL image(s) or a normalised ``(N, C, H, W)`` tensor.
        target: ``None`` (each image's top-1 class), a class index or label, or one per image.
        steps: points on the path (1 to 4096; at least 2 for the Riemann sums).
        method: ``"gausslegendre"``, ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"`` or ``"riemann_trapezoid"`` (captum's points and weights).
        baseline: the path's start, see :func:`baseline_batch`: a number or tensor in the
            normalised input space, ``"black"`` or ``"blur"``.

    Returns:
        ``Attributions`` with ``method="integrated_gradients"``, ``attributions``
        ``(N, C, H, W)``, ``maps`` their sum over channels, and ``completeness`` ``(N,)``:
        ``attributions.sum() - (F(x) - F(baseline))`` per image (captum's convergence delta).
        A warning line names the images whose error exceeds 5% of ``|F(x) - F(baseline)|``.

    Raises:
        BadArgument, BadInput, BadInputType: a bad ``steps``, ``method`` or ``baseline``
            (checked before the network runs).
        BadTarget: unknown class index or label.
    """
    _check_method(method)
    steps = _check_steps(steps, method)
    loaded, batch = prepare(model, images, target=target)
    count = len(batch)
    base, described = baseline_batch(loaded, batch, baseline)
    alphas, weights = quadrature(method, steps)
    with _differentiable(loaded, None):
        chunk = _chunk_size(loaded, batch)
        logits = _logits(loaded, torch.cat([batch, base]), chunk)
        targets, ends_scores = class_scores(logits[:count], target, loaded)
        start_scores = logits[count:].gather(1, targets[:, None])[:, 0]
        attributions = torch.zeros_like(batch)

        def finish(g0: int, sums: torch.Tensor, end: torch.Tensor, start: torch.Tensor | None) -> None:
            assert start is not None
            attributions[g0:g0 + len(sums)] = sums * (end - start)

        _path_sums(loaded, batch, targets, count, lambda a, b: batch[a:b], lambda a, b: base[a:b],
                   alphas, weights, finish, chunk, _gradient_network(loaded, batch))
    change = (ends_scores - start_scores).double()
    completeness = attributions.double().flatten(1).sum(1) - change
    warnings = _completeness_warning(completeness, change, steps)
    settings: dict[str, Any] = {"steps": steps, "method": method, "baseline": described}
    if described == "blur":
        settings["blur_sigma"] = BLUR_SIGMA * min(batch.shape[2:])
    return _result("integrated_gradients", loaded, attributions, targets, ends_scores, settings,
                   completeness=completeness, warnings=warnings)


def integrated_gradients_row(
    model: ModelLike,
    images: Any,
    target: TargetLike = None,
    *,
    steps: int = 50,
    integration: str = "gausslegendre",
    baseline: float | str | torch.Tensor = 0.0,
) -> Attributions:
    """``integrated_gradients`` as the method registry calls it: the approximation ``method``
    is the option ``integration`` there (``--method`` on the CLI), because ``method`` is the
    field that picks the method in the web app's form and ``/api/explain``."""
    return integrated_gradients(model, images, target, steps=steps, method=integration, baseline=baseline)


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def smoothgrad(
    model: ModelLike,
    images: Any,
    target: TargetLike = None,
    *,
    base: str = "saliency",
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
) -> Attributions:
    """SmoothGrad: the mean of a base attribution over ``samples`` noisy copies of each input.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` returning ``(N, classes)`` scores.
        images: PIL image(s) or a normalised ``(N, C, H, W)`` tensor.
        target: ``None`` (each image's top-1 class on the clean input), a class index or label,
            or one per image. The same class is explained on every noisy copy.
        base: ``"saliency"`` (the signed input gradient: captum ``Saliency(abs=False)``),
            ``"guided"`` (guided backprop, see ``convscope.methods.guided``) or ``"ig"``
            (Integrated Gradients with 50 Gauss-Legendre steps from the zero baseline, per copy:
            50 passes per sample).
        samples: noisy copies per image (1 to 4096; with ``"ig"`` at most 1310).
        noise: the noise's standard deviation as a fraction of each input's value range
            (``max - min`` over its channels and pixels); 0.1 to 0.2 in the paper.
        seed: seeds the noise (see the module notes): a seed gives the same map on the CPU.

    Returns:
        ``Attributions`` with ``method="smoothgrad"``, ``attributions`` ``(N, C, H, W)`` the
        mean base attribution, ``maps`` their sum over channels; ``completeness`` is ``None``.

    Raises:
        BadArgument, BadInputType: a bad ``base``, ``samples``, ``noise`` or ``seed``.
        BadTarget: unknown class index or label.
    """
    if not isinstance(base, str) or base not in SMOOTHGRAD_BASES:
        raise BadArgument(f"base {base!r}", "is not a SmoothGrad base", close_matches(str(base), SMOOTHGRAD_BASES))
    steps = SMOOTHGRAD_IG_STEPS if base == "ig" else 1
    samples = _check_count(samples, "samples", 1, min(MAX_SAMPLES, MAX_POINTS_PER_IMAGE // steps))
    noise = _check_noise(noise)
    seed = _check_count(seed, "seed", 0, 2**63 - 1)
    loaded, batch = prepare(model, images, target=target)
    count, shape = len(batch), tuple(batch.shape[1:])
    scales = noise_scales(batch, noise)
    if base == "ig":
        alphas, weights = quadrature(SMOOTHGRAD_IG_METHOD, steps)
    else:
        alphas, weights = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)

    def noisy(g0: int, g1: int) -> torch.Tensor:
        image = torch.arange(g0, g1) // samples
        draws = torch.stack([smoothgrad_noise(g % samples, shape, seed) for g in range(g0, g1)])
        draws = draws.to(device=batch.device, dtype=batch.dtype)
        return batch[image] + scales[image].view(-1, 1, 1, 1) * draws

    def zeros(g0: int, g1: int) -> torch.Tensor:
        return batch.new_zeros((g1 - g0, *shape))

    with _differentiable(loaded, "guided" if base == "guided" else None) as state:
        chunk = _chunk_size(loaded, batch)
        targets, scores = class_scores(_logits(loaded, batch, chunk), target, loaded)
        totals = torch.zeros_like(batch)

        def finish(g0: int, sums: torch.Tensor, end: torch.Tensor, start: torch.Tensor | None) -> None:
            image = torch.arange(g0, g0 + len(sums), device=batch.device) // samples
            totals.index_add_(0, image, sums if start is None else sums * (end - start))

        # guided backprop's rule hooks the original network's rectifiers: it runs there
        network = loaded.module if base == "guided" else _gradient_network(loaded, batch)
        _path_sums(loaded, batch, targets.repeat_interleave(samples), count * samples, noisy,
                   zeros if base == "ig" else None, alphas, weights, finish, chunk, network)
        rules = state.report() if state is not None else None
    settings: dict[str, Any] = {"base": base, "samples": samples, "noise": noise, "seed": seed}
    if base == "ig":
        settings["ig"] = {"steps": steps, "method": SMOOTHGRAD_IG_METHOD, "baseline": 0.0}
    return _result("smoothgrad", loaded, totals / samples, targets, scores, settings,
                   warnings=rule_warnings(rules))


def _completeness_warning(completeness: torch.Tensor, change: torch.Tensor, steps: int) -> tuple[str, ...]:
    relative = completeness.abs() / change.abs().clamp(min=1e-12)
    off = [i for i, r in enumerate(relative.tolist()) if r > COMPLETENESS_WARNING]
    if not off:
        return ()
    worst = float(relative.max())
    where = "the image" if len(relative) == 1 else "image" + ("s " if len(off) > 1 else " ") + ", ".join(map(str, off))
    line = (f"integrated gradients: the attributions of {where} miss the score change by up to {worst:.0%} "
            f"with {steps} steps (more steps bring them closer)")
    return (line,)


def _result(
    method: str, loaded: LoadedModel, attributions: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor,
    settings: dict[str, Any], *, completeness: torch.Tensor | None = None, warnings: tuple[str, ...] = (),
) -> Attributions:
    attributions = attributions.detach().float().cpu()
    return Attributions(
        method=method,
        attributions=attributions,
        maps=attributions.sum(dim=1),
        targets=targets.cpu(),
        labels=target_labels(targets, loaded.categories),
        scores=scores.detach().float().cpu(),
        completeness=None if completeness is None else completeness.float().cpu(),
        settings=settings,
        warnings=warnings,
        preprocess=loaded.preprocess,
    )
