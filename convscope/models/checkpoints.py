"""The convscope checkpoint format: its schema, its checksum, and the one verification every reader runs.

A checkpoint is a plain dict of tensors and Python literals (``torch.save``; it loads with
``weights_only=True``)::

    {"format": "convscope-checkpoint", "version": 2, "role": "last" | "best",
     "arch": "zfnet_mnist", "variant": None | "drop:conv3", "state_dict": {...},
     "categories": [...], "preprocess": {"resize", "crop", "mean", "std", "channels"},
     "epoch": 3, "optimizer": {...} | None, "rng": {...} | None, "metrics": {...},
     "history": [...], "best": {...}, "config": {...}, "checksum": "sha256:<64 hex digits>"}

Why a checksum of our own: a PyTorch file is a zip archive whose members are stored, and torch's
reader does not check their CRCs. A flipped bit in a weight or in Adam's moments loads without a
word, and a resumed run drifts into ``loss nan``. The checksum is SHA-256 over a canonical walk of
every field but itself: tensors by dtype, shape and bytes in logical order (so a channels-last
copy hashes like a contiguous one), literals by type and exact value (floats by ``float.hex``),
dict entries in sorted key order. It covers the metadata too: a flipped epoch or class name is as
wrong as a flipped weight.

``role`` says what the file was written as. ``last`` carries the optimizer and every RNG state and
is the only kind ``--resume`` accepts; ``best`` is for inference. Recording it catches a ``best.pt``
renamed to ``last.pt``, which would otherwise resume with a fresh optimizer and the wrong history.

Schema versions: 1 (no role, no checksum; still read, role inferred from the optimizer state),
2 (role and checksum). A newer version is refused everywhere, by inference and by resume alike.

``verify_checkpoint`` is the single gate: ``read_weights_file`` runs it on anything that claims to
be a convscope checkpoint, so ``load_model``, ``--weights``, ``--from`` and ``--resume`` all check the
same things in the same order: format and version, then the schema (each problem named in one
line), then the checksum.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import torch

from convscope.errors import BadWeightsFile, DamagedWeightsFile
from convscope.preprocess import INTERPOLATIONS, Preprocess

CHECKPOINT_FORMAT = "convscope-checkpoint"
CHECKPOINT_VERSION = 2
ROLES = ("last", "best")
# Every field convscope has always written (schema 1 too); schema 2 adds role and checksum.
REQUIRED_FIELDS = ("arch", "state_dict", "categories", "preprocess", "epoch", "config", "optimizer", "rng",
                   "metrics", "history", "best")
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
_PREPROCESS_FIELDS = ("resize", "crop", "mean", "std", "channels")


def is_checkpoint(obj: object) -> bool:
    """True when ``obj`` claims to be a convscope checkpoint (its format tag, or a checksum), valid or not.

    Either mark suffices, so a checkpoint whose format tag was damaged is still verified (and refused)
    rather than taken for a plain state dict.
    """
    if not isinstance(obj, dict):
        return False
    checksum = obj.get("checksum")
    return obj.get("format") == CHECKPOINT_FORMAT or (isinstance(checksum, str) and checksum.startswith("sha256:"))


def checkpoint_checksum(checkpoint: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` over every field of ``checkpoint`` except ``checksum`` (see the module docstring)."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in checkpoint.items() if key != "checksum"})
    return "sha256:" + digest.hexdigest()


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with the current schema version and a fresh checksum (a new dict)."""
    sealed = {key: value for key, value in checkpoint.items() if key != "checksum"}
    sealed["format"] = CHECKPOINT_FORMAT
    sealed["version"] = CHECKPOINT_VERSION
    sealed["checksum"] = checkpoint_checksum(sealed)
    return sealed


def checkpoint_role(checkpoint: Mapping[str, Any]) -> str:
    """``"last"`` or ``"best"``: recorded since schema 2, inferred from the optimizer state before."""
    role = checkpoint.get("role")
    if isinstance(role, str):
        return role
    return "last" if checkpoint.get("optimizer") is not None and checkpoint.get("rng") is not None else "best"


def checkpoint_preprocess(checkpoint: Mapping[str, Any]) -> Preprocess:
    """The ``Preprocess`` a (verified) checkpoint records."""
    raw = dict(checkpoint["preprocess"])
    return Preprocess(
        resize=raw["resize"], crop=raw["crop"], mean=tuple(float(v) for v in raw["mean"]),
        std=tuple(float(v) for v in raw["std"]), channels=raw["channels"],
        interpolation=str(raw.get("interpolation", "bilinear")),  # older checkpoints: bilinear
    )


def verify_checkpoint(obj: object, source: str, *, role: str | None = None) -> dict[str, Any]:
    """Check a loaded convscope checkpoint before anything uses it.

    Args:
        obj: what ``torch.load`` returned.
        source: the file, for messages.
        role: ``"last"`` to accept only a resumable checkpoint; ``None`` accepts both roles.

    Returns:
        ``obj``, verified.

    Raises:
        DamagedWeightsFile: the checksum does not match (the file changed after it was written), or
            the format tag is garbled.
        BadWeightsFile: a newer schema version, a missing or malformed field (one line naming it),
            or the wrong role.
    """
    where = str(source)
    if not isinstance(obj, dict):
        raise BadWeightsFile(where, f"holds a {type(obj).__name__}, not a convscope checkpoint")
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise DamagedWeightsFile(
            where, f"damaged checkpoint: its format tag is {_shown(obj.get('format'))}, not {CHECKPOINT_FORMAT!r}"
        )
    version = obj.get("version")
    if not _is_int(version) or version < 1:
        raise BadWeightsFile(where, f"invalid checkpoint: schema version {_shown(version)} is not a positive integer")
    if version > CHECKPOINT_VERSION:
        raise BadWeightsFile(
            where, f"checkpoint schema version {version} is newer than this convscope reads ({CHECKPOINT_VERSION})",
            "upgrade convscope to use it",
        )
    problem = schema_problem(obj)
    if problem is not None:
        raise BadWeightsFile(where, f"invalid checkpoint: {problem}")
    if version >= 2 and checkpoint_checksum(obj) != obj["checksum"]:
        raise DamagedWeightsFile(
            where, "damaged checkpoint: its contents do not match the checksum written with it",
            "the file changed after convscope wrote it; restore a copy or train again",
        )
    written_as = checkpoint_role(obj)
    if role is not None and written_as != role:
        if role == "last":
            raise BadWeightsFile(
                where, f"was written as {written_as}.pt (weights for inference, no optimizer or RNG state), "
                "not as a resumable last.pt",
                "a renamed best.pt cannot resume a run; start a new run from it with --from",
            )
        raise BadWeightsFile(where, f"was written as {written_as}.pt, not as {role}.pt")
    return obj


def schema_problem(checkpoint: Mapping[str, Any]) -> str | None:
    """The first thing wrong with a checkpoint's fields, as a short clause, or ``None``."""
    version = checkpoint.get("version")
    required = REQUIRED_FIELDS + (("role", "checksum") if _is_int(version) and version >= 2 else ())
    for name in required:
        if name not in checkpoint:
            return f"missing {name!r}"
    arch = checkpoint["arch"]
    if not isinstance(arch, str) or not arch:
        return f"'arch' is {_kind(arch)}, expected a model name"
    variant = checkpoint.get("variant")
    if variant is not None and not isinstance(variant, str):
        return f"'variant' is {_kind(variant)}, expected a variant text or None"
    problem = (
        _state_dict_problem(checkpoint["state_dict"])
        or _categories_problem(checkpoint["categories"])
        or preprocess_problem(checkpoint["preprocess"])
    )
    if problem is not None:
        return problem
    config = checkpoint["config"]
    if not isinstance(config, dict):
        return f"'config' is {_kind(config)}, expected a dict of training options"
    epochs = config.get("epochs")
    if not _is_int(epochs) or epochs < 1:
        return f"'config.epochs' is {_kind(epochs)}, expected a whole number of epochs, at least 1"
    epoch = checkpoint["epoch"]
    if not _is_int(epoch):
        return f"'epoch' is {_kind(epoch)}, expected a whole number"
    if not 0 <= epoch <= epochs:
        return f"'epoch' {epoch} is outside the run's 0..{epochs} epochs"
    for name, kind in (("metrics", dict), ("best", dict), ("history", list)):
        if not isinstance(checkpoint[name], kind):
            return f"{name!r} is {_kind(checkpoint[name])}, expected a {kind.__name__}"
    if not all(isinstance(entry, dict) for entry in checkpoint["history"]):
        return "'history' holds an entry that is not a dict of metrics"
    if len(checkpoint["history"]) != epoch:
        return f"'history' has {len(checkpoint['history'])} epochs of metrics for epoch {epoch}"
    for name in ("optimizer", "rng"):
        if checkpoint[name] is not None and not isinstance(checkpoint[name], dict):
            return f"{name!r} is {_kind(checkpoint[name])}, expected a dict or None"
    if "role" in checkpoint:
        role = checkpoint["role"]
        if role not in ROLES:
            return f"'role' is {_shown(role)}, expected 'last' or 'best'"
        if role == "last" and (checkpoint["optimizer"] is None or checkpoint["rng"] is None):
            return "written as last.pt but without the optimizer and RNG state a resume needs"
    if "checksum" in checkpoint and not (
        isinstance(checkpoint["checksum"], str) and _CHECKSUM.fullmatch(checkpoint["checksum"])
    ):
        return f"'checksum' is {_shown(checkpoint['checksum'])}, expected 'sha256:' and 64 hex digits"
    return None


def preprocess_problem(raw: object) -> str | None:
    """What is wrong with a stored preprocessing dict, or ``None``."""
    if not isinstance(raw, dict):
        return f"'preprocess' is {_kind(raw)}, expected a dict of {', '.join(_PREPROCESS_FIELDS)}"
    missing = [name for name in _PREPROCESS_FIELDS if name not in raw]
    unknown = sorted(str(name) for name in raw if name not in (*_PREPROCESS_FIELDS, "interpolation"))
    if missing or unknown:
        return "'preprocess' " + "; ".join(
            part for part in (
                f"lacks {', '.join(missing)}" if missing else "",
                f"has unknown fields {', '.join(unknown)}" if unknown else "",
            ) if part
        )
    channels, crop, resize = raw["channels"], raw["crop"], raw["resize"]
    if channels not in (1, 3) or not _is_int(channels):
        return f"'preprocess.channels' is {_shown(channels)}, expected 1 or 3"
    if not _is_int(crop) or not 1 <= crop <= 4096:
        return f"'preprocess.crop' is {_shown(crop)}, expected an input size from 1 to 4096 pixels"
    if resize is not None and (not _is_int(resize) or not 1 <= resize <= 8192):
        return f"'preprocess.resize' is {_shown(resize)}, expected None or a size from 1 to 8192 pixels"
    for name in ("mean", "std"):
        values = raw[name]
        if not isinstance(values, (list, tuple)) or len(values) != channels:
            return f"'preprocess.{name}' is {_shown(values)}, expected {channels} numbers (one per channel)"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return f"'preprocess.{name}' is {_shown(values)}, expected finite numbers"
    if not all(v > 0 for v in raw["std"]):
        return f"'preprocess.std' is {_shown(raw['std'])}, expected positive numbers"
    # Optional (checkpoints before any-model preprocessing have none: bilinear).
    if "interpolation" in raw and raw["interpolation"] not in INTERPOLATIONS:
        return f"'preprocess.interpolation' is {_shown(raw['interpolation'])}, expected one of {', '.join(INTERPOLATIONS)}"
    return None


def _state_dict_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return f"'state_dict' is {_kind(state)}, expected a dict of tensors"
    if not state:
        return "'state_dict' is empty"
    for key, value in state.items():
        if not isinstance(key, str):
            return f"'state_dict' has a key {_shown(key)} that is not a parameter name"
        if not isinstance(value, torch.Tensor):
            return f"'state_dict' entry {key!r} is {_kind(value)}, not a tensor"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"'state_dict' entry {key!r} holds non-finite values (nan or inf)"
    return None


def _categories_problem(categories: object) -> str | None:
    if not isinstance(categories, (list, tuple)) or not categories:
        return f"'categories' is {_kind(categories)}, expected a non-empty list of class names"
    if not all(isinstance(name, str) for name in categories):
        return "'categories' holds a class name that is not a string"
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """``a str ('20')``, ``a list``, ``None``: what a field holds, for messages."""
    if value is None:
        return "None"
    name = type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    if isinstance(value, (str, int, float, bool)):
        return f"{article} {name} ({_shown(value)})"
    return f"{article} {name}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _feed(digest: Any, value: object) -> None:
    # Type tags and length prefixes keep the encoding unambiguous ("ab","c" never hashes like "a","bc").
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        flat = tensor.cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif value is None:
        digest.update(b"N;")
    elif isinstance(value, bool):
        digest.update(b"B1;" if value else b"B0;")
    elif isinstance(value, int):
        digest.update(f"I{value};".encode())
    elif isinstance(value, float):
        digest.update(f"F{value.hex()};".encode())
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(encoded)}:".encode() + encoded)
    elif isinstance(value, bytes):
        digest.update(f"Y{len(value)}:".encode() + value)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        # torch.dtype, torch.device, complex...: whatever weights_only loading allows, by its repr.
        text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode()
        digest.update(f"O{len(text)}:".encode() + text)
