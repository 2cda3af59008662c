"""Results of the gradient-based methods (deconvnet, guided backprop, saliency, Grad-CAM).

All tensors live on the CPU as float32 (indices int64), whatever device the model ran on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from convscope.types import Renderable

if TYPE_CHECKING:
    from convscope.preprocess import Preprocess
    from convscope.probes.relu_rules import RuleReport


@dataclass(frozen=True)
class CamMaps(Renderable):
    """Grad-CAM or Grad-CAM++ maps of a batch.

    Attributes:
        method: ``"gradcam"``, ``"gradcampp"`` (Grad-CAM++) or ``"scorecam"``.
        layer: the layer name as given (or the model's default CAM layer).
        maps: ``(N, H, W)`` float32 in ``[0, 1]`` at input resolution (bilinear upsampling of
            ``raw``, then min-max per image; an all-zero map stays zero).
        raw: ``(N, h, w)`` float32 rectified weighted channel sum at the layer's resolution.
        weights: ``(N, C)`` float32 channel weights.
        targets: ``(N,)`` int64 explained classes.
        labels: class names of ``targets``.
        scores: ``(N,)`` float32 model output (logit) of each target.
        warnings: one line each, for the CLI to print.
        preprocess: the preprocessing of the input the maps were computed on: ``to_image(photo)``
            draws them on the crop the model saw.
    """

    method: str
    layer: str
    maps: torch.Tensor
    raw: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor
    labels: tuple[str, ...]
    scores: torch.Tensor
    warnings: tuple[str, ...] = ()
    preprocess: Preprocess | None = None


@dataclass(frozen=True)
class GradientMaps(Renderable):
    """Input-space attributions: saliency, guided backprop or guided Grad-CAM.

    Attributes:
        method: ``"saliency"``, ``"guided_backprop"`` or ``"guided_gradcam"``.
        attributions: ``(N, C, H, W)`` float32: the raw input gradient (saliency, guided
            backprop), or guided backprop times the Grad-CAM map (guided Grad-CAM).
        maps: ``(N, H, W)`` float32, the largest absolute value over channels (the saliency
            map of Simonyan et al.; captum ``Saliency(abs=True)`` then a max over channels).
        targets: ``(N,)`` int64 explained classes.
        labels: class names of ``targets``.
        scores: ``(N,)`` float32 model output (logit) of each target.
        cam: the Grad-CAM maps used (guided Grad-CAM only).
        warnings: one line each (activations the guided rule could not be applied to...).
        rules: which activations got the guided rule and which did not (guided backprop and
            guided Grad-CAM; ``None`` for saliency). ``rules.applied`` is ``False`` on a network
            without rectifiers, where guided backprop equals saliency.
        preprocess: as in ``CamMaps``.
    """

    method: str
    attributions: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    labels: tuple[str, ...]
    scores: torch.Tensor
    cam: CamMaps | None = None
    warnings: tuple[str, ...] = ()
    rules: RuleReport | None = None
    preprocess: Preprocess | None = None

    # ``method`` -> the registry row that presents it (the others share their row's name)
    ROWS: ClassVar[dict[str, str]] = {"guided_backprop": "guided", "guided_gradcam": "guided-gradcam"}

    def _presented(self) -> tuple[str, Any]:
        return self.ROWS.get(self.method, self.method), self


@dataclass(frozen=True)
class Attributions(Renderable):
    """Input-space attributions that sum to (about) the explained score: LRP, Integrated
    Gradients and SmoothGrad.

    Attributes:
        method: ``"lrp"``, ``"integrated_gradients"`` or ``"smoothgrad"``.
        attributions: ``(N, C, H, W)`` float32: the relevance (LRP), the path integral times
            ``input - baseline`` (IG, captum's ``IntegratedGradients``) or the mean over noisy
            copies of the base method's attribution (SmoothGrad, captum's ``NoiseTunnel``).
        maps: ``(N, H, W)`` float32, ``attributions`` summed over colour channels (signed: where
            the evidence for the class is positive or negative).
        targets: ``(N,)`` int64 explained classes.
        labels: class names of ``targets``.
        scores: ``(N,)`` float32 model output (logit) of each target at the input.
        completeness: ``(N,)`` float32 ``attributions.sum() - (score(x) - score(baseline))``
            per image (Integrated Gradients; ``None`` for the others). It falls as ``steps`` grows.
        settings: the method's settings as plain JSON values (LRP's composite and rule
            parameters, IG's steps, method and baseline, SmoothGrad's base, samples, noise, seed).
        uncovered: layers no rule covers (LRP: modules with parameters or a non-linearity that
            no rule of the composite handles; relevance passes them as a plain gradient).
        warnings: one line each, for the CLI to print.
        preprocess: as in ``CamMaps``.
    """

    method: str
    attributions: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    labels: tuple[str, ...]
    scores: torch.Tensor
    completeness: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    uncovered: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    preprocess: Preprocess | None = None

    # ``method`` -> the registry row that presents it
    ROWS: ClassVar[dict[str, str]] = {"integrated_gradients": "ig"}

    def _presented(self) -> tuple[str, Any]:
        return self.ROWS.get(self.method, self.method), self


@dataclass(frozen=True)
class DeconvProjections(Renderable):
    """Zeiler & Fergus deconvnet projections of chosen feature maps of one layer.

    ``K`` projections per image: the chosen channel(s), or each image's ``top`` strongest.

    Attributes:
        layer: the layer name as given.
        location: ``"max"`` (only each channel's strongest cell was projected) or ``"all"``
            (the whole feature map was).
        channels: ``(N, K)`` int64 channel of each projection.
        projections: ``(N, K, C, H, W)`` float32 pixel-space projections.
        values: ``(N, K)`` float32 the channel's largest activation in the image.
        positions: ``(N, K, 2)`` int64 ``(row, col)`` of that activation in the layer's grid.
        boxes: ``(N, K, 4)`` int64 ``(top, left, bottom, right)`` input pixels seen by that cell
            (bottom/right exclusive), to crop the projection and the image patch.
        boxes_exact: ``False`` when the receptive field passes residual additions or functional
            ops, where the box is the main path's field (see ``convscope.probes.geometry``).
        grid: ``(h, w)`` of the layer's feature maps.
        warnings: one line each (activations the deconvnet rule could not be applied to...).
        rules: which activations got the deconvnet rule and which did not (none: the
            projections are plain gradients of the activation).
        preprocess: as in ``CamMaps``.
    """

    layer: str
    location: str
    channels: torch.Tensor
    projections: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    boxes_exact: bool
    grid: tuple[int, int]
    warnings: tuple[str, ...] = ()
    rules: RuleReport | None = None
    preprocess: Preprocess | None = None

    def _presented(self) -> tuple[str, Any]:
        return "deconv", self
