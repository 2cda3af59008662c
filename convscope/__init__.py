"""convscope: a microscope for convolutional networks.

The public API is exactly ``__all__``; heavy modules import on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_EXPORTS = {
    "deconv": "convscope.methods.deconvnet:deconv",
    "guided_backprop": "convscope.methods.guided:guided_backprop",
    "saliency": "convscope.methods.guided:saliency",
    "gradcam": "convscope.methods.gradcam:gradcam",
    "gradcampp": "convscope.methods.gradcam:gradcampp",
    "guided_gradcam": "convscope.methods.gradcam:guided_gradcam",
    "occlusion": "convscope.methods.occlusion:occlusion",
    "relu_rule": "convscope.probes.relu_rules:relu_rule",
    "load_model": "convscope.models.load:load_model",
    "wrap_model": "convscope.models.load:wrap_model",
    "list_models": "convscope.models.registry:list_models",
    "load_image": "convscope.imageio:load_image",
    "iter_images": "convscope.imageio:iter_images",
    "classify": "convscope.methods.predict:classify",
    "summary": "convscope.methods.summary:summary",
    "activation_maps": "convscope.methods.activations:activation_maps",
    "feature_maps": "convscope.methods.activations:feature_maps",
    "conv_filters": "convscope.methods.filters:conv_filters",
    "list_layers": "convscope.probes.layers:list_layers",
    "capture": "convscope.probes.hooks:capture",
    "Preprocess": "convscope.preprocess:Preprocess",
    "LoadedModel": "convscope.types:LoadedModel",
    "ConvscopeError": "convscope.errors:ConvscopeError",
    "train": "convscope.training.loop:train",
    "TrainConfig": "convscope.training.loop:TrainConfig",
    "resume_training": "convscope.training.loop:resume",
    "evaluate": "convscope.training.evaluate:evaluate",
    "ablate": "convscope.training.ablation:ablate",
    "top_patches": "convscope.dataset.patches:top_patches",
    "scorecam": "convscope.methods.scorecam:scorecam",
    "lrp": "convscope.methods.lrp:lrp",
    "integrated_gradients": "convscope.methods.paths:integrated_gradients",
    "smoothgrad": "convscope.methods.paths:smoothgrad",
    "invariance": "convscope.analysis.invariance:invariance",
    "correspondence": "convscope.analysis.correspondence:correspondence",
    "quality": "convscope.analysis.quality:quality",
    "tune_cpu": "convscope.runtime:tune_cpu",
}

# Old spellings: still importable, listed nowhere (one name per method: ``gradcampp``).
_OLD_NAMES = {"gradcam_plus_plus": "convscope.methods.gradcam:gradcampp"}

__all__ = sorted([*_EXPORTS, "__version__"])  # noqa: PLE0605 - built from _EXPORTS, one list of names


# Subpackages reachable as attributes (``convscope.render.pictures...``) without an import line.
_SUBPACKAGES = ("render",)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"convscope.{name}")
    target = _EXPORTS.get(name) or _OLD_NAMES.get(name)
    if target is None:
        raise AttributeError(f"module 'convscope' has no attribute {name!r}")
    module_name, attribute = target.split(":")
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, *_SUBPACKAGES]
