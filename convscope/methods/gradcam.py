"""Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al. 2018) and guided Grad-CAM.

The layer's output is captured in the autograd graph (``capture(mode="graph")``) and its
gradient comes from ``torch.autograd.grad``: no module backward hooks, no ``.grad`` written on
the model, and the backward pass stops at the layer instead of running down to the pixels.

Post-processing follows pytorch-grad-cam: ReLU of the weighted channel sum, bilinear resize to
the input (half-pixel centres, like ``cv2.resize``), min-max per image. pytorch-grad-cam
min-max scales before and after resizing; bilinear interpolation is affine-invariant, so one
scaling after resizing gives the same map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from convscope.errors import UnknownLayer
from convscope.methods._common import ModelLike, prepare
from convscope.methods.activations import normalize_per_image
from convscope.methods.guided import class_scores, graph_forward, rule_warnings
from convscope.methods.results import CamMaps, GradientMaps
from convscope.methods.targets import TargetLike, target_labels
from convscope.probes.hooks import Capture, capture
from convscope.probes.layers import alias_of, default_cam_layer, map_layer
from convscope.types import LoadedModel

CAM_METHODS = ("gradcam", "gradcampp")


def feature_map_of(store: Capture[torch.Tensor], key: str, name: str) -> torch.Tensor:
    """The last output of a captured layer, checked to be an ``(N, C, h, w)`` feature map."""
    calls = store.outputs.get(key)
    if not calls:
        raise UnknownLayer(
            name, "did not run during the forward pass, or returned something other than a tensor",
            "pick a layer the model calls (see 'convscope layers')",
        )
    output = calls[-1]
    if output.dim() != 4:
        raise UnknownLayer(
            name, f"has output shape {tuple(output.shape)}, not a (N, C, H, W) feature map",
            "pick a convolutional layer (see 'convscope layers')",
        )
    return output


def layer_gradient(score: torch.Tensor, output: torch.Tensor, name: str, *, retain_graph: bool = False) -> torch.Tensor:
    """d score / d layer output, or ``UnknownLayer`` when the score does not depend on the layer."""
    if not output.requires_grad:
        raise UnknownLayer(name, "is not differentiable (its output is detached from the graph)")
    (grad,) = torch.autograd.grad(score, output, retain_graph=retain_graph, allow_unused=True)
    if grad is None:
        raise UnknownLayer(name, "does not influence the class score", "pick a layer before the classifier")
    return grad


def _default_layer(loaded: LoadedModel, layer: str | None, input_size: Sequence[int] | None = None) -> str:
    if layer:
        return layer
    chosen = default_cam_layer(loaded, input_size)
    if not chosen:
        raise UnknownLayer(loaded.name, "has no default Grad-CAM layer", "name one with layer=/--layer")
    return alias_of(loaded, chosen)


def _channel_weights(method: str, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    # Grad-CAM++ closed form with exp(score) (eq. 19 of the paper), as pytorch-grad-cam has it.
    grads_2 = grads.pow(2)
    grads_3 = grads_2 * grads
    sum_activations = activations.sum(dim=(2, 3), keepdim=True)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (grads.clamp_min(0) * alpha).sum(dim=(2, 3))


def _cam_maps(
    method: str, name: str, loaded: LoadedModel, activations: torch.Tensor, grads: torch.Tensor,
    size: tuple[int, int], targets: torch.Tensor, scores: torch.Tensor,
) -> CamMaps:
    activations = activations.detach().float()
    weights = _channel_weights(method, activations, grads.float())
    return cam_from_weights(method, name, loaded, activations, weights, size, targets, scores)


def cam_from_weights(
    method: str, name: str, loaded: LoadedModel, activations: torch.Tensor, weights: torch.Tensor,
    size: tuple[int, int], targets: torch.Tensor, scores: torch.Tensor,
) -> CamMaps:
    """The class-activation map every CAM method ends with: the ReLU of the channels summed with
    ``weights`` ``(N, C)``, upsampled bilinearly to ``size`` and scaled to [0, 1] per image."""
    raw = (weights[:, :, None, None] * activations).sum(dim=1).clamp_min(0)
    up = F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return CamMaps(
        method=method,
        layer=name,
        maps=normalize_per_image(up).cpu(),
        raw=raw.cpu(),
        weights=weights.cpu(),
        targets=targets.cpu(),
        labels=target_labels(targets, loaded.categories),
        scores=scores.detach().float().cpu(),
        preprocess=loaded.preprocess,
    )


def _cam(model: ModelLike, images: Any, target: TargetLike, layer: str | None, method: str) -> CamMaps:
    loaded, batch = prepare(model, images, target=target)
    name = _default_layer(loaded, layer, batch.shape[1:])
    found = map_layer(loaded, name, batch.shape[1:])
    with graph_forward(loaded, batch) as (x, _, stack):
        store = stack.enter_context(capture(loaded.module, {found.path: found.module}, mode="graph", layouts={found.path: found.layout}))
        logits = loaded.module(x)
    activations = feature_map_of(store, found.path, name)
    targets, scores = class_scores(logits, target, loaded)
    grads = layer_gradient(scores.sum(), activations, name)
    return _cam_maps(method, name, loaded, activations, grads, (int(batch.shape[-2]), int(batch.shape[-1])), targets, scores)


def gradcam(
    model: ModelLike, images: Any, target: TargetLike = None, layer: str | None = None
) -> CamMaps:
    """Grad-CAM: channel weights are the spatial mean of the class-score gradient at ``layer``;
    the map is the ReLU of the weighted channel sum, upsampled to the input.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` returning ``(N, classes)`` scores.
        images: PIL image(s), converted with the model's preprocessing, or a normalised
            ``(N, C, H, W)`` float tensor; paths, numpy arrays and ``None`` are refused
            with ``BadInputType`` (see ``convscope.validate``).
        target: ``None`` (each image's top-1 class), a class index or label, or one per image.
        layer: alias or module path; default: the model's ``cam_layer`` (last conv stage).
            A module called more than once per forward pass (a reused ReLU) counts at its
            last call.

    Returns:
        ``CamMaps`` with ``maps`` ``(N, H, W)`` float32 in ``[0, 1]`` at input resolution.

    Raises:
        UnknownLayer: no such layer, or its output is not an ``(N, C, h, w)`` feature map.
        BadTarget: unknown class index or label.
    """
    return _cam(model, images, target, layer, "gradcam")


def gradcampp(
    model: ModelLike, images: Any, target: TargetLike = None, layer: str | None = None
) -> CamMaps:
    """Grad-CAM++: like :func:`gradcam`, with channel weights from positive gradients weighted
    by the closed-form ``alpha`` of Chattopadhay et al. (as pytorch-grad-cam computes them).

    Returns:
        ``CamMaps`` with ``maps`` ``(N, H, W)`` float32 in ``[0, 1]``.
    """
    return _cam(model, images, target, layer, "gradcampp")


# The name this function had before the one-name rule (issue 23); kept for code that calls it.
gradcam_plus_plus = gradcampp


def guided_gradcam(
    model: ModelLike, images: Any, target: TargetLike = None, layer: str | None = None
) -> GradientMaps:
    """Guided Grad-CAM: guided backprop times the Grad-CAM map, pixel by pixel.

    One forward pass serves both backward passes: the rectifier rule is switched off for the
    plain gradient at ``layer`` and on for the guided gradient at the input.

    Returns:
        ``GradientMaps`` with ``attributions`` ``(N, C, H, W)``, ``maps`` ``(N, H, W)`` (largest
        absolute value over channels), and ``cam`` the Grad-CAM maps used.

    Raises:
        UnknownLayer, BadTarget: as :func:`gradcam`.
    """
    loaded, batch = prepare(model, images, target=target)
    name = _default_layer(loaded, layer, batch.shape[1:])
    found = map_layer(loaded, name, batch.shape[1:])
    with graph_forward(loaded, batch, "guided") as (x, state, stack):
        store = stack.enter_context(capture(loaded.module, {found.path: found.module}, mode="graph", layouts={found.path: found.layout}))
        logits = loaded.module(x)
    assert state is not None
    activations = feature_map_of(store, found.path, name)
    targets, scores = class_scores(logits, target, loaded)
    score = scores.sum()
    state.active = False
    grads = layer_gradient(score, activations, name, retain_graph=True)
    state.active = True
    (guided,) = torch.autograd.grad(score, x)
    report = state.report()
    cam = _cam_maps("gradcam", name, loaded, activations, grads, (int(batch.shape[-2]), int(batch.shape[-1])), targets, scores)
    product = guided.float().cpu() * cam.maps[:, None]
    return GradientMaps(
        method="guided_gradcam",
        attributions=product,
        maps=product.abs().amax(dim=1),
        targets=cam.targets,
        labels=cam.labels,
        scores=cam.scores,
        cam=cam,
        warnings=rule_warnings(report),
        rules=report,
        preprocess=loaded.preprocess,
    )
