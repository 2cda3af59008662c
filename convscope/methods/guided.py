"""Input gradients: saliency (Simonyan et al. 2014) and guided backprop (Springenberg et al. 2015).

Both take the gradient of one class score per image with respect to the input pixels;
guided backprop swaps the rectifiers' backward for the guided rule (``probes.relu_rules``).
A guided result records where the rule went (``rules``, a ``RuleReport``): on a network without
rectifiers (GELU, SiLU, Hardswish: ConvNeXt, EfficientNet) it equals the saliency map, and its
one warning line and its record say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from convscope.methods._common import ModelLike, prepare
from convscope.methods.results import GradientMaps
from convscope.methods.targets import TargetLike, resolve_targets, target_labels
from convscope.probes.hooks import eval_mode
from convscope.probes.relu_rules import RuleReport, RuleState, relu_rule
from convscope.types import LoadedModel


@contextmanager
def graph_forward(
    loaded: LoadedModel, batch: torch.Tensor, rule: str | None = None
) -> Iterator[tuple[torch.Tensor, RuleState | None, ExitStack]]:
    """Yield ``(input leaf, rule state, stack)`` for one differentiable forward pass.

    The input is a fresh leaf that requires grad (so a graph exists even for a frozen model,
    and the caller's tensor is never marked); the model is in eval mode with grad enabled, and
    the optional rectifier rule applies. Further context managers (captures) go on ``stack``.
    Parameters' ``.grad`` is never written: callers use ``torch.autograd.grad``.
    """
    x = batch.detach().requires_grad_(True)
    with ExitStack() as stack:
        if any(m.training for m in loaded.module.modules()):
            stack.enter_context(eval_mode(loaded.module))
        stack.enter_context(torch.enable_grad())
        state = stack.enter_context(relu_rule(loaded.module, rule)) if rule else None
        yield x, state, stack


def class_scores(
    logits: torch.Tensor, target: TargetLike, loaded: LoadedModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets (N,) int64, scores (N,))``: the explained class of each image and its logit."""
    targets = resolve_targets(target, logits, loaded.categories, loaded.name)
    return targets, logits.gather(1, targets[:, None])[:, 0]


def rule_warnings(report: RuleReport | None) -> tuple[str, ...]:
    """A rule-based result's warnings: the report's one line, when it has one."""
    line = report.warning() if report is not None else None
    return (line,) if line else ()


def _input_gradient(
    model: ModelLike, images: Any, target: TargetLike, rule: str | None
) -> tuple[LoadedModel, torch.Tensor, torch.Tensor, torch.Tensor, RuleReport | None]:
    loaded, batch = prepare(model, images, target=target)
    with graph_forward(loaded, batch, rule) as (x, state, _):
        logits = loaded.module(x)
    targets, scores = class_scores(logits, target, loaded)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    return loaded, grad, targets, scores.detach(), state.report() if state is not None else None


def _result(
    method: str, loaded: LoadedModel, grad: torch.Tensor, targets: torch.Tensor,
    scores: torch.Tensor, report: RuleReport | None,
) -> GradientMaps:
    grad = grad.float()
    return GradientMaps(
        method=method,
        attributions=grad.cpu(),
        maps=grad.abs().amax(dim=1).cpu(),
        targets=targets.cpu(),
        labels=target_labels(targets, loaded.categories),
        scores=scores.float().cpu(),
        warnings=rule_warnings(report),
        rules=report,
        preprocess=loaded.preprocess,
    )


def saliency(model: ModelLike, images: Any, target: TargetLike = None) -> GradientMaps:
    """Gradient of the class score with respect to the input pixels.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` returning ``(N, classes)`` scores.
        images: PIL image(s), converted with the model's preprocessing, or a normalised
            ``(N, C, H, W)`` float tensor; paths, numpy arrays and ``None`` are refused
            with ``BadInputType`` (see ``convscope.validate``).
        target: ``None`` (top-1 class), a class index or label, or one per image.

    Returns:
        ``GradientMaps``: ``attributions`` ``(N, C, H, W)`` raw gradients and ``maps``
        ``(N, H, W)`` their largest absolute value over channels.

    Raises:
        BadTarget: unknown class index or label.
    """
    loaded, grad, targets, scores, report = _input_gradient(model, images, target, None)
    return _result("saliency", loaded, grad, targets, scores, report)


def guided_backprop(model: ModelLike, images: Any, target: TargetLike = None) -> GradientMaps:
    """Guided backpropagation: the input gradient with each rectifier's backward replaced by
    ``relu(g * [x > 0])`` (see ``convscope.probes.relu_rules`` for ReLU6 and other activations).

    On a network whose activations are not rectifiers (GELU, SiLU, Hardswish) no rule applies
    and the result is the saliency gradient, bit for bit: ``rules.note`` and the one warning
    line say so rather than passing it off as guided.

    Returns:
        ``GradientMaps``: ``attributions`` ``(N, C, H, W)`` raw guided gradients (what captum's
        ``GuidedBackprop`` returns), ``maps`` ``(N, H, W)`` their largest absolute value over
        channels, ``rules`` the :class:`~convscope.probes.relu_rules.RuleReport` (which
        activation sites got the rule, which did not), and one ``warnings`` line when the
        result is not a pure guided pass.

    Raises:
        BadTarget: unknown class index or label.
    """
    loaded, grad, targets, scores, report = _input_gradient(model, images, target, "guided")
    return _result("guided_backprop", loaded, grad, targets, scores, report)
