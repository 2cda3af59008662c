"""Shared result and model containers. Tensors in results live on the CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from convscope.preprocess import Preprocess

if TYPE_CHECKING:
    from PIL import Image

    from convscope.models.registry import ModelSpec


class Renderable:
    """``to_image`` / ``save`` / ``_repr_png_`` for result dataclasses (Jupyter shows them inline).

    The image is the main figure of the method's renderer (its registry row's ``renderer``), the
    one the CLI writes: one presentation per method. The render import happens inside the
    methods: computing a result must not pull in PIL and the drawing code (``methods/`` never
    imports them), and most results are never drawn. One small base rather than methods attached
    from ``render``: the methods are visible to type checkers, ``help()`` and tab completion
    before anything was drawn.
    """

    def _presented(self) -> tuple[str, Any]:
        """The registry row whose renderer draws this result, and the result as it takes it: the
        result's ``method``, else its class name (``OcclusionResult`` -> ``occlusion``)."""
        return str(getattr(self, "method", "") or type(self).__name__.removesuffix("Result").lower()), self

    def to_image(self, image: Any = None, *, model: Any = None, index: int = 0,
                 probability: float | None = None) -> Image.Image:
        """The figure as an RGB PIL image.

        A map lies on the image the model saw: a PIL photo or a batch goes through the model's
        preprocessing (the resize and centre crop), from ``model`` or, without it, from the
        ``preprocess`` the result recorded when it was computed. A uint8 array is taken as
        already being that view.

        Args:
            image: the photo to draw maps on (a PIL image, an ``(H, W, 3)`` uint8 array, or the
                normalised input batch); without it, maps are drawn on grey or alone.
            model: the ``LoadedModel`` the result came from (named in the caption, with a
                warning when its weights are random; also preprocesses ``image``).
            index: which image of a batch.
            probability: the explained class's probability (gradient methods know only logits).
        """
        from PIL import Image

        from convscope.methods.registry import get_method
        from convscope.render.views import render

        name, result = self._presented()
        views = render(get_method(name), result, image, model=model, index=index, probability=probability)
        return Image.fromarray(views.figure)

    def save(self, path: str | os.PathLike[str], image: Any = None, **options: Any) -> Path:
        """Write ``to_image(image, **options)`` as a PNG, atomically; returns the path."""
        from convscope.imageio import save_png

        return save_png(path, self.to_image(image, **options))

    def _repr_png_(self) -> bytes:
        from convscope.render.figures import png_bytes

        return png_bytes(self.to_image())


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network ready to be looked at.

    Attributes:
        module: the ``nn.Module``; convscope switches it to eval mode only inside its own calls.
        name: registry name, or ``"custom"`` for a wrapped user module.
        preprocess: how images become its input.
        categories: class names, index-aligned with the logits.
        stages: ordered ``alias -> module path`` of its conv stages.
        cam_layer: default Grad-CAM layer (module path).
        first_conv: module path of the first convolution.
        weights: where the weights came from, for reports.
        spec: the registry row, when the model came from the registry.
    """

    module: nn.Module
    name: str
    preprocess: Preprocess
    categories: tuple[str, ...]
    stages: dict[str, str] = field(default_factory=dict)
    cam_layer: str = ""
    first_conv: str = ""
    weights: str = "as given"
    spec: ModelSpec | None = None

    @property
    def device(self) -> torch.device:
        for parameter in self.module.parameters():
            return parameter.device
        for buffer in self.module.buffers():
            return buffer.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.module.parameters():
            return tensor.dtype
        return torch.float32


@dataclass(frozen=True)
class Prediction(Renderable):
    """Top-k classes of one image.

    Attributes:
        indices: ``(k,)`` int64 class indices, most probable first.
        probabilities: ``(k,)`` float32 softmax probabilities.
        labels: class names for ``indices``.
    """

    indices: torch.Tensor
    probabilities: torch.Tensor
    labels: tuple[str, ...]

    def _presented(self) -> tuple[str, Any]:
        return "classify", [self]

    def to_image(self, image: Any = None, *, model: Any = None, index: int = 0,
                 probability: float | None = None) -> Image.Image:
        """The top-k classes as probability bars (``image``, ``index``, ``probability``: unused)."""
        return super().to_image(model=model)

    def as_dicts(self) -> list[dict[str, object]]:
        return [
            {"index": int(i), "label": label, "probability": float(p)}
            for i, p, label in zip(self.indices, self.probabilities, self.labels, strict=True)
        ]


@dataclass(frozen=True)
class ActivationMaps(Renderable):
    """Channel-mean activation maps of several layers for a batch.

    Attributes:
        layers: layer names (aliases where the model has them), in forward order.
        maps: per layer, ``(N, H, W)`` float32 in ``[0, 1]`` at input resolution
            (channel-mean of the layer output, bilinear upsampled, min-max normalised per image).
        raw: per layer, ``(N, h, w)`` float32 channel-means at the layer's own resolution.
        preprocess: the preprocessing of the input the maps were computed on (``to_image(photo)``
            draws them on the crop the model saw).
    """

    layers: tuple[str, ...]
    maps: dict[str, torch.Tensor]
    raw: dict[str, torch.Tensor]
    preprocess: Preprocess | None = None

    def _presented(self) -> tuple[str, Any]:
        return "activations", self


@dataclass(frozen=True)
class FeatureMaps(Renderable):
    """Selected channels of one layer.

    Attributes:
        layer: the layer name.
        channels: ``(K,)`` int64 channel indices shown.
        maps: ``(N, K, h, w)`` float32 raw activations of those channels.
        strength: ``(N, K)`` float32 mean activation of each shown channel.
    """

    layer: str
    channels: torch.Tensor
    maps: torch.Tensor
    strength: torch.Tensor

    def _presented(self) -> tuple[str, Any]:
        return "features", self


@dataclass(frozen=True)
class Filters(Renderable):
    """Convolution kernels of one layer.

    Attributes:
        layer: module path of the convolution.
        weights: ``(out, in, kh, kw)`` float32 raw kernels.
        normalized: ``(out, in, kh, kw)`` float32, each filter min-max scaled to ``[0, 1]``.
        strongest_input: ``(out,)`` int64, the input channel with the largest L2 norm in each
            filter (how deeper layers, whose inputs are not colours, are shown).
    """

    layer: str
    weights: torch.Tensor
    normalized: torch.Tensor
    strongest_input: torch.Tensor

    def _presented(self) -> tuple[str, Any]:
        return "filters", self


@dataclass(frozen=True)
class LayerInfo:
    """One row of a model summary (see ``convscope.summary``)."""

    name: str
    type: str
    depth: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    params: int
    trainable_params: int
    kernel: tuple[int, int] | None
    stride: tuple[int, int] | None
    padding: tuple[int, int] | None
    receptive_field: int | None
    jump: int | None
    start: float | None
    rf_exact: bool
    mult_adds: int
    activation_bytes: int
    alias: str | None = None
    receptive_field_kind: str | None = None  # "exact", "approximate", "global"; None: no tensor out


@dataclass(frozen=True)
class ModelSummary(Renderable):
    """Per-layer measurements of a model for one input size."""

    model: str
    input_size: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    total_params: int
    trainable_params: int
    total_mult_adds: int
    param_bytes: int
    activation_bytes: int
    notes: tuple[str, ...] = ()

    def to_image(self, image: Any = None, *, model: Any = None, index: int = 0,
                 probability: float | None = None) -> Image.Image:
        """The summary table drawn in a monospace font (the other arguments: unused)."""
        from PIL import Image

        from convscope.render.pictures import summary_figure

        return Image.fromarray(summary_figure(self))
