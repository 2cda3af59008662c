"""``load_model``: registry name + weights request -> ``LoadedModel``; ``wrap_model`` for user modules."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from convscope.errors import BadArgument, BadInputType, BadWeightsFile, ConvscopeError, WeightsMismatch
from convscope.models.checkpoints import checkpoint_preprocess
from convscope.models.labels import get_labels
from convscope.models.registry import DEFAULT_MODEL, ModelSpec, get_spec
from convscope.models.variants import apply_variant
from convscope.models.weights import (
    is_checkpoint,
    load_state_dict_strict,
    pretrained_state_dict,
    read_weights_file,
    state_dict_of,
)
from convscope.preprocess import IMAGENET, Preprocess
from convscope.types import LoadedModel

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The one place a device request is checked (``load_model``, training, the CLI's ``--device``).

    Args:
        device: ``None`` or ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``, or a ``torch.device`` of those kinds. Case and surrounding
            spaces are ignored.

    Raises:
        BadArgument: another kind of device (``meta`` holds no data, ``xla``, ``hpu``... are
            not supported), a malformed name, or a device this machine does not have.
    """
    if device is None:
        device = "auto"
    if not isinstance(device, (str, torch.device)):
        raise BadArgument(f"--device {device!r}", f"expected a device name, got {type(device).__name__}", f"use {DEVICE_CHOICES}")
    text = str(device).strip().lower()
    subject = f"--device {text or repr(str(device))}"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BadArgument(subject, "not a device", f"use {DEVICE_CHOICES}") from exc
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BadArgument(subject, "CUDA is not available on this machine", "use --device cpu or auto")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise BadArgument(subject, f"this machine has {count} CUDA device{'s' if count != 1 else ''} (0..{count - 1})")
        return resolved
    if resolved.type == "mps":
        if resolved.index not in (None, 0):
            raise BadArgument(subject, "there is one MPS device: use mps")
        if not torch.backends.mps.is_available():
            raise BadArgument(subject, "MPS (Apple GPU) is not available on this machine", "use --device cpu or auto")
        return torch.device("mps")
    why = "holds no data, so nothing can be computed on it" if resolved.type == "meta" else "is not supported"
    raise BadArgument(subject, f"the {resolved.type!r} device {why}", f"use {DEVICE_CHOICES}")


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
            file or a convscope checkpoint. A checkpoint is verified first (schema, checksum) and
            brings its architecture, ablation variant, class names and preprocessing.
        seed: seed for random initialisation.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns:
        the model in eval mode on ``device`` with its preprocessing and class names.

    Raises:
        UnknownModel, WeightsUnavailable, WeightsMismatch, BadWeightsFile (``DamagedWeightsFile``
            for a checkpoint that changed after it was written).
        BadArgument: a device that is not auto, cpu, cuda, cuda:N or mps, or not present.
    """
    target_device = resolve_device(device)  # before any work: a bad --device fails at once
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
    variant = None
    if checkpoint is not None and is_checkpoint(checkpoint):
        if checkpoint["arch"] != spec.name:
            raise WeightsMismatch(
                str(path), f"is a checkpoint of {checkpoint['arch']!r}, not of {spec.name!r}"
            )
        categories = tuple(checkpoint["categories"])
        num_classes = len(categories)
        preprocess = checkpoint_preprocess(checkpoint)
        variant = checkpoint.get("variant")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.build(num_classes)
        if variant:
            _rebuild_variant(module, spec, variant, preprocess, str(path))

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
    module.to(target_device)
    if spec.channels_last:  # measured faster for this architecture (registry row)
        module.to(memory_format=torch.channels_last)
    return from_spec(spec, module, preprocess, categories, described)


def from_spec(spec: ModelSpec, module: nn.Module, preprocess: Preprocess, categories: Sequence[str], weights: str) -> LoadedModel:
    """A ``LoadedModel`` for a registry architecture: names, stages and default layers from
    ``spec``; ``weights`` says where the weights came from.

    Stages an ablation variant dropped (now ``nn.Identity``) are left out; the default CAM layer
    falls back to the last stage that remains, the first conv to the first ``Conv2d`` left.
    """
    stages = {alias: path for alias, path in spec.stages.items() if not _dropped(module, path)}
    cam_layer = spec.cam_layer
    if _dropped(module, cam_layer) and stages:
        cam_layer = next(reversed(stages.values()))
    first_conv = spec.first_conv
    if _dropped(module, first_conv):
        first_conv = next((name for name, sub in module.named_modules() if isinstance(sub, nn.Conv2d)), "")
    return LoadedModel(
        module=module,
        name=spec.name,
        preprocess=preprocess,
        categories=tuple(categories),
        stages=stages,
        cam_layer=cam_layer,
        first_conv=first_conv,
        weights=weights,
        spec=spec,
    )


def _dropped(module: nn.Module, path: str) -> bool:
    try:
        return bool(path) and isinstance(module.get_submodule(path), nn.Identity)
    except AttributeError:
        return False


def _rebuild_variant(module: nn.Module, spec: ModelSpec, variant: str, preprocess: Preprocess, source: str) -> None:
    """Redo the ablation surgery a checkpoint records, so its weights fit (in place)."""
    try:
        apply_variant(module, variant, stages=dict(spec.stages), input_size=preprocess.input_size)
    except ConvscopeError as exc:
        raise BadWeightsFile(
            source, f"invalid checkpoint: its variant {variant!r} does not apply to {spec.name}: {exc.reason}"
        ) from exc


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
    from convscope.models.stages import default_stages
    from convscope.validate import describe

    if not isinstance(module, nn.Module):
        raise BadInputType("module", f"expected a torch nn.Module, got {describe(module)}")
    if not isinstance(preprocess, Preprocess):
        raise BadInputType("preprocess", f"expected a convscope.Preprocess, got {describe(preprocess)}")
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
    from convscope.validate import describe

    hint = f"build it with convscope.load_model({model!r})" if isinstance(model, str) else None
    raise BadInputType("model", f"expected a LoadedModel (convscope.load_model) or an nn.Module, got {describe(model)}", hint)
