"""Models from outside the registry: the model-spec grammar and one builder per kind.

A model spec is what ``load_model(name)``, every CLI ``--model`` and the web app's ``model`` field
take:

- a built-in name (``alexnet``): a ``ModelSpec`` row of ``models/registry.py``;
- ``torchvision:NAME``: any classification model of torchvision's registry;
- ``timm:NAME``: any timm model (architecture or ``name.tag``; needs ``pip install convscope[timm]``);
- ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``: a factory called without arguments that
  returns an ``nn.Module`` or a ``LoadedModel`` (``convscope.wrap_model``). Like ``torchrun`` or
  ``uvicorn``, this imports and runs the user's code;
- ``FILE.pt2``: a ``torch.export`` archive, unflattened so layer names survive.

torch, torchvision and timm are imported inside the functions (``convscope --help`` stays fast).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convscope.errors import BadArgument, BadInput, BadWeightsFile, UnknownModel, WeightsUnavailable
from convscope.preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

SOURCES = ("torchvision", "timm")
SPEC_FORMS = "a built-in name, torchvision:NAME, timm:NAME, FILE.py:FUNCTION, package.module:FUNCTION or FILE.pt2"
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")


@dataclass(frozen=True)
class ModelRequest:
    """A parsed model spec.

    Attributes:
        kind: ``"builtin"``, ``"torchvision"``, ``"timm"``, ``"file"`` (``FILE.py:FUNCTION``),
            ``"module"`` (``package.module:FUNCTION``) or ``"export"`` (``FILE.pt2``).
        text: the spec as typed (stripped): the ``LoadedModel.name`` of every kind but built-ins.
        target: the name, the file or the module.
        function: the factory's name (``file`` and ``module`` kinds).
    """

    kind: str
    text: str
    target: str
    function: str = ""

    @property
    def runs_code(self) -> bool:
        """True for the kinds that import user code or read a file given by path."""
        return self.kind in ("file", "module", "export")


def parse_model_spec(text: str) -> ModelRequest:
    """Which kind of model ``text`` names (nothing is imported or read).

    Raises:
        BadArgument: an empty spec, or ``torchvision:``/``timm:`` without a name.
    """
    spec = str(text).strip()
    if not spec:
        raise BadArgument("--model", "is empty", f"give {SPEC_FORMS}")
    source, colon, rest = spec.partition(":")
    if colon and source in SOURCES:
        if not rest.strip():
            raise BadArgument(f"--model {spec}", f"names no model after '{source}:'",
                              f"list them with 'convscope models --all {source}:'")
        return ModelRequest(source, spec, rest.strip())
    if spec.lower().endswith(".pt2"):
        return ModelRequest("export", spec, spec)
    head, colon, function = spec.rpartition(":")
    if colon and _IDENTIFIER.match(function):
        if head.lower().endswith(".py"):
            return ModelRequest("file", spec, head, function)
        if _IDENTIFIER.match(head):
            return ModelRequest("module", spec, head, function)
    return ModelRequest("builtin", spec, spec)


def _source_hint(word: str) -> str | None:
    near = difflib.get_close_matches(word.lower(), SOURCES, n=1, cutoff=0.7)
    return f"did you mean {near[0]}:NAME?" if near else None


# ---------------------------------------------------------------- listing


def torchvision_names() -> list[str]:
    """Every classification model of torchvision's registry, sorted."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def timm_names() -> list[str] | None:
    """Every timm architecture, sorted; ``None`` when timm is not installed."""
    if importlib.util.find_spec("timm") is None:
        return None
    import timm

    return sorted(timm.list_models())


def matches(name: str, pattern: str | None) -> bool:
    """``pattern``: a glob when it has ``*?[``, else a substring; case-insensitive."""
    if not pattern:
        return True
    name, pattern = name.lower(), pattern.lower()
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


# ---------------------------------------------------------------- preprocessing


def make_preprocess(*, resize: int | None, crop: int, mean: Any, std: Any, interpolation: str = "bilinear") -> Preprocess:
    """A ``Preprocess`` from a peer's transform settings (an unknown filter name: bilinear)."""
    from convscope.preprocess import INTERPOLATIONS

    chosen = str(interpolation).lower()
    channels = len(tuple(mean))
    return Preprocess(resize=resize, crop=crop, mean=tuple(float(v) for v in mean),
                      std=tuple(float(v) for v in std), channels=channels,
                      interpolation=chosen if chosen in INTERPOLATIONS else "bilinear")


def torchvision_preprocess(weights: Any) -> Preprocess:
    """The ``Preprocess`` of a torchvision weights entry (``weights.transforms()``)."""
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    interpolation = getattr(transform.interpolation, "value", str(transform.interpolation))
    return make_preprocess(resize=resize, crop=crop, mean=transform.mean, std=transform.std,
                           interpolation=str(interpolation))


def timm_preprocess(module: nn.Module, subject: str) -> Preprocess:
    """The ``Preprocess`` of a timm model's ``pretrained_cfg`` (input_size, crop_pct, mean, std,
    interpolation): ``resize = floor(size / crop_pct)``, as timm's eval transform."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=module)
    _, height, width = config["input_size"]
    if height != width:
        raise BadArgument(subject, f"takes {height}×{width} inputs; convscope's preprocessing makes square ones",
                          "wrap it with convscope.wrap_model and a square Preprocess in a FILE.py:FUNCTION factory")
    crop_pct = float(config.get("crop_pct") or 1.0)
    resize = math.floor(height / crop_pct)
    return make_preprocess(resize=resize, crop=int(height), mean=config["mean"], std=config["std"],
                           interpolation=str(config.get("interpolation", "bilinear")))


# ---------------------------------------------------------------- pretrained files


def _offline() -> bool:
    return os.environ.get("CONVSCOPE_OFFLINE") == "1"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def offline_error(subject: str, url: str, cache: Path | None, why: str) -> WeightsUnavailable:
    """The one line for pretrained weights that are neither cached nor downloadable."""
    where = f"download {url} to {cache}" if cache is not None else f"download {url}"
    return WeightsUnavailable(
        subject, f"pretrained weights are not cached and could not be downloaded ({why})",
        f"{where}, or pass that file with --weights FILE, or use --weights random",
    )


def hub_cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _timm_weight_file(cfg: Any) -> tuple[Path | None, str, Path | None]:
    """``(cached file or None, url to fetch, cache path for that url or None)`` of a timm pretrained_cfg."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None) or ""
    if hub_id:
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache

            for name in names:
                found = try_to_load_from_cache(hub_id, name)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found), f"https://huggingface.co/{hub_id}/resolve/main/{name}", None
        except ImportError:
            pass
        if url and hub_cache_path(url).is_file():
            return hub_cache_path(url), url, hub_cache_path(url)
        return None, f"https://huggingface.co/{hub_id}/resolve/main/{names[0]}", None
    if url:
        cache = hub_cache_path(url)
        return (cache if cache.is_file() else None), url, cache
    return None, "", None


# ---------------------------------------------------------------- torchvision


def _torchvision_weights_entry(name: str) -> Any:
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _check_torchvision_name(request: ModelRequest) -> None:
    names = torchvision_names()
    if request.target not in names:
        raise UnknownModel(request.text, "is not a torchvision classification model",
                           _close(request.target, names, "torchvision", "torchvision:"))


def _close(word: str, names: list[str], source: str, prefix: str) -> str:
    near = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    if near:
        return "did you mean: " + ", ".join(prefix + n for n in near)
    return f"list them with 'convscope models --all {source}:'"


def torchvision_pretrained_available(name: str) -> bool:
    entry = _torchvision_weights_entry(name)
    return entry is not None and hub_cache_path(entry.url).is_file()


def build_torchvision(request: ModelRequest, weights: str, seed: int, num_classes: int | None = None
                      ) -> tuple[nn.Module, Preprocess, tuple[str, ...] | None, str]:
    """``(module, preprocess, categories or None, weights description)`` of ``torchvision:NAME``.

    ``weights``: ``"pretrained"`` (torchvision's default weights: from torch hub's cache, else
    downloaded; offline, ``WeightsUnavailable`` names the URL and the cache path) or ``"random"``
    (seeded init; the preprocessing and class names are still those of the default weights).
    ``num_classes``: build another classifier size (a weights file for a fine-tuned model).
    """
    from torchvision.models import get_model_builder

    _check_torchvision_name(request)
    builder = get_model_builder(request.target)
    entry = _torchvision_weights_entry(request.target)
    preprocess = torchvision_preprocess(entry) if entry is not None else make_preprocess(
        resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    categories = tuple(entry.meta["categories"]) if entry is not None and entry.meta.get("categories") else None
    if weights == "pretrained":
        if entry is None:
            raise WeightsUnavailable(request.text, "torchvision publishes no pretrained weights for it",
                                     "pass --weights FILE or --weights random")
        cache = hub_cache_path(entry.url)
        if not cache.is_file() and _offline():
            raise offline_error(request.text, entry.url, cache, "offline: CONVSCOPE_OFFLINE=1")
        try:
            with _quiet():
                module = builder(weights=entry, progress=False)
        except Exception as exc:  # URLError, socket errors, a hash mismatch of a damaged file...
            if cache.is_file():
                raise BadWeightsFile(str(cache), f"torchvision cannot load it: {_first_line(exc)}",
                                     "delete it to download it again") from exc
            raise offline_error(request.text, entry.url, cache, _first_line(exc)) from exc
        return module, preprocess, categories, f"pretrained ({entry}{', cached' if cache.is_file() else ''})"
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
        categories = None
    module = _seeded(seed, lambda: builder(weights=None, **kwargs))
    return module, preprocess, categories, f"random (seed {seed})"


# ---------------------------------------------------------------- timm


def _timm(subject: str) -> Any:
    try:
        import timm
    except ImportError:
        raise UnknownModel(subject, "timm is not installed", "pip install convscope[timm]") from None
    return timm


def timm_pretrained_available(name: str) -> bool:
    if importlib.util.find_spec("timm") is None:
        return False
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg is not None and _timm_weight_file(cfg)[0] is not None


def _check_timm_name(request: ModelRequest) -> Any:
    timm = _timm(request.text)
    if not timm.is_model(request.target):
        raise UnknownModel(request.text, "is not a timm model",
                           _close(request.target, timm.list_models(), "timm", "timm:"))
    return timm


def build_timm(request: ModelRequest, weights: str, seed: int, num_classes: int | None = None
               ) -> tuple[nn.Module, Preprocess, tuple[str, ...] | None, str]:
    """``(module, preprocess, categories or None, weights description)`` of ``timm:NAME``.

    ``weights``: ``"pretrained"`` (timm's default weights for the name or its tag: from the
    Hugging Face or torch hub cache, else downloaded; offline, ``WeightsUnavailable`` names the
    URL) or ``"random"`` (seeded). Preprocessing comes from the model's ``pretrained_cfg``.
    """
    timm = _check_timm_name(request)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights == "pretrained":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(request.target)
        found, url, cache = _timm_weight_file(cfg) if cfg is not None else (None, "", None)
        if found is None and not url:
            raise WeightsUnavailable(request.text, "timm publishes no pretrained weights for it",
                                     "pass --weights FILE or --weights random")
        if found is None and _offline():
            raise offline_error(request.text, url, cache, "offline: CONVSCOPE_OFFLINE=1")
        overlay = {"file": str(found)} if found is not None else None
        try:
            with _quiet():
                module = timm.create_model(request.target, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as exc:
            if found is not None:
                raise BadWeightsFile(str(found), f"timm cannot load it: {_first_line(exc)}") from exc
            raise offline_error(request.text, url, cache, _first_line(exc)) from exc
        described = f"pretrained (timm {request.target}{', cached' if found is not None else ''})"
    else:
        module = _seeded(seed, lambda: timm.create_model(request.target, pretrained=False, **kwargs))
        described = f"random (seed {seed})"
    return module, timm_preprocess(module, request.text), _timm_categories(module), described


def _timm_categories(module: nn.Module) -> tuple[str, ...] | None:
    count = getattr(module, "num_classes", None)
    if count == 1000:
        return None  # wrap_model names 1000 outputs with convscope's ImageNet labels
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        if subset:
            names = tuple(d.split(",")[0].strip() for d in ImageNetInfo(subset).label_descriptions())
            if len(names) == count:
                return names
    except Exception:  # noqa: BLE001 - an older timm without ImageNetInfo: generic names
        return None
    return None


# ---------------------------------------------------------------- factories


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _where(exc: BaseException, within: Path | None) -> str:
    """``" (at net.py:12)"``: the innermost frame of the user's code that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    chosen = None
    for frame in frames:
        if within is None or Path(frame.filename).resolve() == within:
            chosen = frame
    if chosen is None and frames:
        chosen = frames[-1]
    return f" (at {Path(chosen.filename).name}:{chosen.lineno})" if chosen is not None else ""


def call_factory(request: ModelRequest) -> Any:
    """Import the factory's file or module, call the function without arguments and return what
    it gave (checked by the caller). This runs the user's code.

    Raises:
        UnknownModel: no such file or module, it does not import, or it has no such function.
        BadArgument: the factory raised (its exception type, message and line).
    """
    file: Path | None = None
    if request.kind == "file":
        file = Path(request.target).expanduser().resolve()
        if not file.is_file():
            raise UnknownModel(request.text, f"no such file {request.target}" if not file.exists()
                               else f"{request.target} is not a file")
        stem = re.sub(r"\W", "_", file.stem)
        name = f"convscope_factory_{stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
        folder = file.parent
    else:
        name = request.target
        folder = Path.cwd()  # like uvicorn: a module next to where the command runs imports
    with _on_path(folder):
        try:
            if file is not None:
                loader_spec = importlib.util.spec_from_file_location(name, file)
                if loader_spec is None or loader_spec.loader is None:
                    raise UnknownModel(request.text, f"cannot import {request.target}")
                owner = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = owner
                try:
                    loader_spec.loader.exec_module(owner)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
            else:
                owner = importlib.import_module(name)
        except UnknownModel:
            raise
        except ModuleNotFoundError as exc:
            if file is None and exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                raise UnknownModel(request.text, f"no module named {exc.name}",
                                   _source_hint(request.target) or "is it installed, or in the current folder?") from None
            raise UnknownModel(request.text, f"cannot import {request.target}: {type(exc).__name__}: "
                               f"{_first_line(exc)}{_where(exc, file)}") from exc
        except (Exception, SystemExit) as exc:
            raise UnknownModel(request.text, f"cannot import {request.target}: {type(exc).__name__}: "
                               f"{_first_line(exc)}{_where(exc, file)}") from exc
        factory = getattr(owner, request.function, None)
        if factory is None:
            public = [n for n, v in vars(owner).items() if callable(v) and not n.startswith("_")]
            near = difflib.get_close_matches(request.function, public, n=3, cutoff=0.6)
            raise UnknownModel(request.text, f"{request.target} has no function {request.function!r}",
                               "did you mean: " + ", ".join(near) if near else None)
        if not callable(factory):
            raise UnknownModel(request.text, f"{request.target}.{request.function} is a "
                               f"{type(factory).__name__}, not a function")
        try:
            return factory()
        except (Exception, SystemExit) as exc:
            raise BadArgument(request.text, f"the factory raised {type(exc).__name__}: "
                              f"{_first_line(exc)}{_where(exc, file)}") from exc


# ---------------------------------------------------------------- torch.export archives


def load_exported(request: ModelRequest) -> tuple[nn.Module, Preprocess]:
    """An unflattened ``torch.export`` archive (``ExportedModule``) and its preprocessing.

    ``torch.export.load(path).module()`` keeps the module *names* (its parameters sit under
    ``layer1.0.conv1``) but its forward is one flat graph: a hook on ``layer1.0`` never fires.
    ``torch.export.unflatten`` rebuilds one ``InterpreterModule`` per original submodule with
    the original paths, whose forwards run (hooks fire, gradients flow); it is what is returned.
    The graph is frozen at export time: batch-norm in the mode it was exported in, and the input
    shape as exported (a static batch of 1 refuses batches of several images in one line).
    The input size sets the crop; mean and std are ImageNet's (give others through a factory:
    ``FILE.py:FUNCTION`` returning ``wrap_model(torch.export.unflatten(...), preprocess=...)``).
    """
    import torch

    path = Path(request.target).expanduser()
    if not path.is_file():
        raise UnknownModel(request.text, "no such file" if not path.exists() else "is not a file")
    try:
        with _quiet():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise BadWeightsFile(request.text, f"not a torch.export archive ({type(exc).__name__}: {_first_line(exc)})",
                             "write one with torch.export.save(torch.export.export(model, (x,)), 'model.pt2')") from exc
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in inputs]
    if len(shapes) != 1 or shapes[0] is None or len(shapes[0]) != 4:
        raise BadArgument(request.text, f"was exported with {len(shapes)} input{'s' if len(shapes) != 1 else ''}"
                          " other than one (N, C, H, W) image batch", "export the model with one image input")
    shape = tuple(int(d) if isinstance(d, int) else None for d in shapes[0])
    try:
        with _quiet():
            inner = torch.export.unflatten(program)
    except Exception as exc:
        raise BadWeightsFile(request.text, f"cannot rebuild its modules (torch.export.unflatten: {_first_line(exc)})") from exc
    originals = _original_types(program)
    module = _classes()["ExportedModule"](inner, archive=str(path), input_shape=shape, original_types=originals)
    channels, height, width = shape[1] or 3, shape[2], shape[3]
    size = height or width or 224
    if height is not None and width is not None and height != width:
        raise BadArgument(request.text, f"was exported for {height}×{width} inputs; convscope's preprocessing makes square ones",
                          "export at a square size, or give a Preprocess through a FILE.py:FUNCTION factory")
    mean = (0.485, 0.456, 0.406) if channels == 3 else (0.449,) * channels
    std = (0.229, 0.224, 0.225) if channels == 3 else (0.226,) * channels
    return module, make_preprocess(resize=round(size * 256 / 224), crop=size, mean=mean, std=std)


def _original_types(program: Any) -> dict[str, str]:
    """Module path -> the class it had before export (``"torch.nn.modules.activation.ReLU"``)."""
    found: dict[str, str] = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, kind in stack.values():
            found.setdefault(str(path), str(kind) if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind)))
    found.pop("", None)
    return found


# ---------------------------------------------------------------- helpers


def _seeded(seed: int, build: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet():
            return build()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchvision and timm warn about defaults (GoogLeNet's init_weights, deprecated names), and
    torch hub prints ``Downloading: ...`` even with ``progress=False``: a failed download must
    end in the one ``error:`` line, nothing before it (and stdout stays the command's own)."""
    import contextlib
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _shell_class() -> type:
    from torch import nn

    class ModuleShell(nn.Module):
        """A module that *is* its inner module for paths, parameters and buffers (it shares their
        dicts), so every layer keeps its path; ``forward`` calls the inner forward.
        ``train()``/``eval()`` set the inner module's own flag too; other attributes
        (``feature_info``, ``pretrained_cfg``...) are read from the inner module."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            object.__setattr__(self, "inner", inner)
            for key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
                object.__setattr__(self, key, getattr(inner, key))
            object.__setattr__(self, "training", inner.training)

        def train(self, mode: bool = True) -> ModuleShell:
            super().train(mode)
            self.inner.training = mode
            return self

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                inner = self.__dict__.get("inner")
                if inner is None or name.startswith("__"):
                    raise
                return getattr(inner, name)

    return ModuleShell


def __getattr__(name: str) -> Any:
    # ``ExportedModule``/``OutputSelect`` subclass nn.Module: built on first use, so importing this
    # module does not import torch.
    if name in ("ModuleShell", "ExportedModule", "OutputSelect"):
        return _classes()[name]
    raise AttributeError(name)


_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    shell = _shell_class()

    class OutputSelect(shell):  # type: ignore[misc, valid-type]
        """The inner module, returning ``output[index]`` of its tuple/list/dict output.

        Layer paths, parameters and state-dict keys are the inner module's.
        """

        def __init__(self, inner: nn.Module, index: int | str) -> None:
            super().__init__(inner)
            object.__setattr__(self, "output_index", index)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return select_output(self.inner(*args, **kwargs), self.output_index)

    class ExportedModule(shell):  # type: ignore[misc, valid-type]
        """An unflattened ``torch.export`` program (see ``load_exported``).

        Attributes:
            archive: the ``.pt2`` file.
            input_shape: the exported input shape, ``None`` for a dynamic dimension.
            original_types: module path -> the class it had before export (the unflattened
                modules are all ``InterpreterModule``: an exported ReLU is no ``nn.ReLU``).
        """

        def __init__(self, inner: nn.Module, *, archive: str, input_shape: tuple[int | None, ...],
                     original_types: dict[str, str]) -> None:
            super().__init__(inner)
            object.__setattr__(self, "archive", archive)
            object.__setattr__(self, "input_shape", input_shape)
            object.__setattr__(self, "original_types", original_types)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            shape = tuple(getattr(x, "shape", ()))
            fixed = self.input_shape
            if len(shape) != len(fixed) or any(f is not None and f != s for f, s in zip(fixed, shape, strict=False)):
                shown = "×".join("N" if d is None else str(d) for d in fixed)
                what = "batches of one image" if fixed[0] == 1 and shape[1:] == fixed[1:] else f"inputs of shape {shown}"
                raise BadInput(self.archive, f"was exported for {what} only; this method gives it "
                               f"{'×'.join(map(str, shape))}",
                               "use --batch-size 1 where the method allows it, or re-export with "
                               "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}")
            return self.inner(x, *args, **kwargs)

    _CLASSES.update(ModuleShell=shell, OutputSelect=OutputSelect, ExportedModule=ExportedModule)
    return _CLASSES


def describe_output(output: Any) -> str:
    """``"a tuple of 4 tensors"``, ``"a dict with keys logits, aux"``, ``"a str"``."""
    import torch

    if isinstance(output, dict):
        return f"a dict with keys {', '.join(map(str, list(output)[:8]))}"
    if isinstance(output, (list, tuple)):
        tensors = sum(isinstance(item, torch.Tensor) for item in output)
        noun = "tensors" if tensors == len(output) else "items"
        return f"a {type(output).__name__} of {len(output)} {noun if len(output) != 1 else noun[:-1]}"
    return f"a {type(output).__name__}"


def select_output(output: Any, index: int | str) -> Any:
    """``output[index]`` of a tuple/list (int) or a dict (key).

    Raises:
        BadArgument: the output is a tensor already, or the index does not fit it.
    """
    import torch

    subject = f"--output-index {index}"
    if isinstance(output, torch.Tensor):
        raise BadArgument(subject, "the model returns one tensor already", "drop --output-index / output_index")
    if isinstance(output, dict):
        if index in output:
            return output[index]
        if isinstance(index, int) and str(index) in output:
            return output[str(index)]
        raise BadArgument(subject, f"the model returns {describe_output(output)}; no such key")
    if isinstance(output, (list, tuple)):
        if not isinstance(index, int):
            raise BadArgument(subject, f"the model returns {describe_output(output)}: give a position (0, 1, ...)")
        if not -len(output) <= index < len(output):
            raise BadArgument(subject, f"the model returns {describe_output(output)}: "
                              f"positions are 0..{len(output) - 1}")
        return output[index]
    raise BadArgument(subject, f"the model returns {describe_output(output)}, which cannot be indexed")
