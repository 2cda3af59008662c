"""Layer-wise relevance propagation (Bach et al., PLoS ONE 2015), with zennit's composites.

The class score is split into per-pixel relevance by one backward pass whose rules
(``convscope.probes.lrp_rules``) replace each layer's gradient: the forward pass is the model's
own, and the backward pass is seeded with the explained logit, so the input relevance adds up
to (about) that logit. BatchNorm is merged into the preceding layer for the backward pass and
residual additions share relevance in proportion to their summands, as zennit's canonizers do;
the result equals zennit's ``EpsilonPlusFlat`` / ``EpsilonGammaBox`` / ``EpsilonAlpha2Beta1``
with those canonizers. Layers no rule covers are named in the result, not guessed at.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from convscope.errors import BadArgument, close_matches
from convscope.methods._common import ModelLike, prepare
from convscope.methods.guided import class_scores, graph_forward
from convscope.methods.results import Attributions
from convscope.methods.targets import TargetLike, target_labels
from convscope.probes.lrp_rules import COMPOSITES, box_bounds, lrp_rules
from convscope.runtime import allocator_tuned


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def lrp(
    model: ModelLike,
    images: Any,
    target: TargetLike = None,
    *,
    composite: str = "epsilon-plus-flat",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
) -> Attributions:
    """Layer-wise relevance propagation of the target class score to the input pixels.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` returning ``(N, classes)`` scores.
        images: PIL image(s), converted with the model's preprocessing, or a normalised
            ``(N, C, H, W)`` float tensor.
        target: ``None`` (top-1 class), a class index or label, or one per image.
        composite: which rule each layer gets (zennit's composites):
            ``"epsilon-plus-flat"`` (flat first layer, z-plus convolutions, epsilon dense
            layers), ``"epsilon-gamma-box"`` (z-box first convolution bounded by the normalised
            values of black and white pixels, gamma convolutions, epsilon dense layers) or
            ``"epsilon-alpha2-beta1"`` (alpha=2, beta=1 convolutions, epsilon dense layers).
        epsilon: stabiliser of the epsilon rule, ``>= 0`` (0 gives LRP-0).
        gamma: weight of the positive contributions in the gamma rule, ``>= 0``.

    Returns:
        ``Attributions``: ``attributions`` ``(N, C, H, W)`` input relevance, ``maps`` its sum over
        colours, the explained classes and their logits, ``settings`` (composite, epsilon,
        gamma, and the box bounds ``low``/``high`` per channel for epsilon-gamma-box),
        ``uncovered`` (module paths no rule covers) and one warning line naming them.

    Raises:
        BadArgument: unknown composite, or epsilon/gamma negative or not finite.
        BadTarget: unknown class index or label.
    """
    for name, value in (("epsilon", epsilon), ("gamma", gamma)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise BadArgument(name, f"must be a finite number >= 0, not {value!r}")
    if composite not in COMPOSITES:
        raise BadArgument("composite", f"unknown composite {composite!r}", close_matches(composite, COMPOSITES))
    loaded, batch = prepare(model, images, target=target)
    settings: dict[str, Any] = {"composite": composite, "epsilon": float(epsilon), "gamma": float(gamma)}
    low = high = None
    if composite == "epsilon-gamma-box":
        low, high = box_bounds(loaded.preprocess.mean, loaded.preprocess.std)
        settings["low"] = [round(float(v), 6) for v in low.flatten()]
        settings["high"] = [round(float(v), 6) for v in high.flatten()]
    with graph_forward(loaded, batch) as (x, _, stack):
        state = stack.enter_context(
            lrp_rules(loaded.module, composite, epsilon=epsilon, gamma=gamma, low=low, high=high)
        )
        logits = loaded.module(x)
        targets, scores = class_scores(logits, target, loaded)
        seed = torch.zeros_like(logits).scatter_(1, targets[:, None], scores[:, None].detach())
        (relevance,) = torch.autograd.grad(logits, x, seed)
    relevance = relevance.float().cpu()
    return Attributions(
        method="lrp",
        attributions=relevance,
        maps=relevance.sum(dim=1),
        targets=targets.cpu(),
        labels=target_labels(targets, loaded.categories),
        scores=scores.detach().float().cpu(),
        settings=settings,
        uncovered=state.uncovered,
        warnings=_uncovered_warning(state.uncovered),
        preprocess=loaded.preprocess,
    )


def _uncovered_warning(uncovered: tuple[str, ...], shown: int = 6) -> tuple[str, ...]:
    """One line naming the layers no rule covers (the first ``shown``; the JSON has them all)."""
    if not uncovered:
        return ()
    names = ", ".join(uncovered[:shown])
    if len(uncovered) > shown:
        names += f" and {len(uncovered) - shown} more"
    layers = f"{len(uncovered)} layer{'s' if len(uncovered) != 1 else ''}"
    return (f"LRP has no rule for {layers} ({names}): relevance passes them as a plain gradient",)
