"""``load_model``: registry name + weights request -> ``LoadedModel``; ``wrap_model`` for user modules."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convscope.errors import BadArgument, WeightsMismatch
from convscope.models.labels import get_labels
from convscope.models.registry import DEFAULT_MODEL, ModelSpec, get_spec
from convscope.models.weights import (
    is_checkpoint,
    load_state_dict_strict,
    pretrained_state_dict,
    read_weights_file,
    state_dict_of,
)
from convscope.preprocess import IMAGENET, Preprocess
from convscope.types import LoadedModel


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadArgument(f"--device {device}", "not a device (use auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BadArgument(f"--device {device}", "CUDA is not available on this machine")
    return resolved


def load_model(
    name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Build a registered model and load its weights.

    Args:
        name: registry name; ``None`` means the architecture recorded in a convscope checkpoint
            given as ``weights``, else the default ``efficientnet_lite0``.
        weights: ``"pretrained"`` (default when the model has published weights), ``"random"``
            (seeded init; the default otherwise), or a path to a ``.pth``/``.safetensors``
            file or a convscope checkpoint.
        seed: seed for random initialisation.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``...

    Returns:
        the model in eval mode on ``device`` with its preprocessing and class names.

    Raises:
        UnknownModel, WeightsUnavailable, WeightsMismatch, BadWeightsFile.
    """
    checkpoint = None
    path = None
    if weights not in (None, "pretrained", "random"):
        path = Path(os.fspath(weights))  # type: ignore[arg-type]
        checkpoint = read_weights_file(path)
        if is_checkpoint(checkpoint) and name is None:
            name = str(checkpoint["arch"])
    spec = get_spec(name or DEFAULT_MODEL)
    if weights is None:
        weights = "pretrained" if spec.pretrained is not None else "random"

    categories = spec.categories
    preprocess = spec.preprocess
    num_classes = len(categories)
    if checkpoint is not None and is_checkpoint(checkpoint):
        if checkpoint["arch"] != spec.name:
            raise WeightsMismatch(
                str(path), f"is a checkpoint of {checkpoint['arch']!r}, not of {spec.name!r}"
            )
        categories = tuple(checkpoint.get("categories") or categories)
        num_classes = len(categories)
        if checkpoint.get("preprocess"):
            preprocess = Preprocess(**_preprocess_fields(checkpoint["preprocess"]))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.build(num_classes)

    if weights == "pretrained":
        state, described = pretrained_state_dict(spec)
        load_state_dict_strict(module, state, source=f"{spec.name} pretrained", model_name=spec.name)
    elif weights == "random":
        described = f"random (seed {seed})"
    else:
        assert checkpoint is not None and path is not None
        state = state_dict_of(checkpoint)
        if spec.adapt_state_dict is not None and not is_checkpoint(checkpoint):
            own = module.state_dict().keys()
            if not set(state) & set(own):
                state = spec.adapt_state_dict(state)
        load_state_dict_strict(module, state, source=str(path), model_name=spec.name)
        described = str(path)

    module.eval()
    module.to(resolve_device(device))
    return from_spec(spec, module, preprocess, categories, described)


def from_spec(spec: ModelSpec, module: nn.Module, preprocess: Preprocess, categories: Sequence[str], weights: str) -> LoadedModel:
    """A ``LoadedModel`` for a registry architecture: names, stages and default layers from
    ``spec``; ``weights`` says where the weights came from."""
    return LoadedModel(
        module=module,
        name=spec.name,
        preprocess=preprocess,
        categories=tuple(categories),
        stages=dict(spec.stages),
        cam_layer=spec.cam_layer,
        first_conv=spec.first_conv,
        weights=weights,
        spec=spec,
    )


def _preprocess_fields(raw: dict[str, Any]) -> dict[str, Any]:
    fields = dict(raw)
    for key in ("mean", "std"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return fields


def wrap_model(
    module: nn.Module,
    *,
    preprocess: Preprocess = IMAGENET,
    categories: Sequence[str] | None = None,
    name: str = "custom",
) -> LoadedModel:
    """Wrap any user ``nn.Module`` so every convscope function accepts it.

    Layers are then named by their module path. Without ``categories`` the labels are the
    ImageNet names when the model has 1000 outputs, else ``class 0``, ``class 1``...
    """
    from convscope.probes.layers import default_stages

    if categories is None:
        categories = _guess_categories(module, preprocess)
    stages = default_stages(module)
    last = next(reversed(stages.values()), "") if stages else ""
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    return LoadedModel(
        module=module,
        name=name,
        preprocess=preprocess,
        categories=tuple(categories),
        stages=stages,
        cam_layer=last,
        first_conv=convs[0] if convs else "",
        weights="as given",
    )


def _guess_categories(module: nn.Module, preprocess: Preprocess) -> tuple[str, ...]:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    outputs = linears[-1].out_features if linears else None
    if outputs == 1000:
        return get_labels("imagenet")
    if outputs is None:
        return ()
    return tuple(f"class {i}" for i in range(outputs))


def as_loaded(model: LoadedModel | nn.Module) -> LoadedModel:
    """Accept a ``LoadedModel`` or a bare ``nn.Module`` (wrapped with ImageNet defaults)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return wrap_model(model)
    raise TypeError(f"expected a LoadedModel or nn.Module, got {type(model).__name__}")
