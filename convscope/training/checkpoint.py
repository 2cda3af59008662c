"""Training checkpoints: written atomically, sealed with a checksum, verified when read.

The format (fields, schema version, checksum, roles) and its verification live in
``convscope.models.checkpoints``, because ``load_model`` reads the same files. This module adds what
only training needs: assembling a checkpoint from a run, RNG states, the atomic write, and the
stricter reading ``--resume`` does (``read_checkpoint(path, role="last")``).

``last.pt`` carries the optimizer and every RNG state so a killed run resumes bit-exactly;
``best.pt`` is for inference and leaves them out.
"""

from __future__ import annotations

import errno
import io
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from convscope.errors import BadWeightsFile, CheckpointWriteError, OutputError
from convscope.models.checkpoints import CHECKPOINT_VERSION, ROLES, seal
from convscope.models.weights import is_checkpoint, read_weights_file
from convscope.preprocess import Preprocess
from convscope.training.wording import literal, option_error

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointWriteError",
    "checkpoint_bytes",
    "make_checkpoint",
    "preprocess_fields",
    "read_checkpoint",
    "restore_rng_state",
    "rng_state",
    "write_checkpoint",
]


def preprocess_fields(preprocess: Preprocess) -> dict[str, Any]:
    """``Preprocess`` -> the JSON/weights-only-safe dict stored in checkpoints."""
    fields = asdict(preprocess)
    fields["mean"] = [float(v) for v in preprocess.mean]
    fields["std"] = [float(v) for v in preprocess.std]
    return fields


def rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step draws from, as weights-only-safe values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss": gauss},
    }


def restore_rng_state(state: dict[str, Any], data_generator: torch.Generator) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


def make_checkpoint(
    *,
    arch: str,
    state_dict: dict[str, torch.Tensor],
    categories: tuple[str, ...] | list[str],
    preprocess: Preprocess,
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    best: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    variant: str | None = None,
    role: str = "best",
) -> dict[str, Any]:
    """Assemble a sealed checkpoint dict (tensors are detached CPU copies).

    Args:
        role: ``"last"`` (resumable: ``optimizer`` and ``rng`` required) or ``"best"`` (inference).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if role == "last" and (optimizer is None or rng is None):
        raise ValueError("a last.pt checkpoint needs the optimizer and RNG state")
    return seal({
        "role": role,
        "arch": arch,
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
        "categories": list(categories),
        "preprocess": preprocess_fields(preprocess),
        "epoch": int(epoch),
        "optimizer": optimizer,
        "rng": rng,
        "metrics": dict(metrics or {}),
        "history": list(history or []),
        "best": dict(best or {}),
        "config": dict(config),
        "variant": variant,
    })


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """Serialise once; the same bytes can go to ``last.pt`` and ``best.pt``."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def _write(handle: IO[bytes], data: bytes) -> None:
    # One seam for tests that simulate a full disk in the middle of a write.
    handle.write(data)


def write_checkpoint(path: str | os.PathLike[str], data: bytes | dict[str, Any]) -> Path:
    """Write a checkpoint atomically: ``path`` holds the old or the new file, never a partial one.

    Raises:
        CheckpointWriteError: the write failed (``ENOSPC``, ``EACCES``...); the previous file at
            ``path`` is untouched and no temporary file is left. A full disk says
            ``no space left on <mount> (N bytes needed)``.
    """
    from convscope.imageio import atomic_path

    payload = data if isinstance(data, bytes) else checkpoint_bytes(data)
    target = Path(path)
    try:
        with atomic_path(target) as temp, open(temp, "wb") as handle:
            _write(handle, payload)
            handle.flush()
    except OutputError as exc:
        # atomic_path says "no space left on <mount>"; add what was needed and what was kept.
        if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        kept = "the previous checkpoint is intact" if target.exists() else "nothing was written"
        raise option_error(
            CheckpointWriteError, literal(target), literal(f"{exc.reason} ({len(payload)} bytes needed); {kept}"),
            "free some space and rerun with {resume}",
        ) from exc.__cause__
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ENOSPC:
            why = "no space left on device"
        kept = "the previous checkpoint is intact" if target.exists() else "nothing was written"
        raise option_error(
            CheckpointWriteError, literal(target), literal(f"cannot write checkpoint: {why.lower()}; {kept}"),
            "free space and rerun with {resume}",
        ) from exc
    return target


def read_checkpoint(path: str | os.PathLike[str], *, role: str | None = None) -> dict[str, Any]:
    """Load and verify a convscope checkpoint (``weights_only``).

    Args:
        role: ``"last"`` for resuming: only a file written as ``last.pt`` is accepted, and its
            RNG state is checked too. ``None`` accepts ``last`` and ``best``.

    Raises:
        WeightsUnavailable: no such file.
        BadWeightsFile: unreadable, not a convscope checkpoint, a newer schema, a malformed field,
            or the wrong role.
        DamagedWeightsFile: the file changed after it was written (checksum).
    """
    checkpoint = read_weights_file(path, role=role)
    if not is_checkpoint(checkpoint):
        raise BadWeightsFile(str(path), "is a plain weights file, not a convscope training checkpoint")
    if role == "last":
        problem = _rng_problem(checkpoint["rng"]) or _optimizer_problem(checkpoint["optimizer"])
        if problem is not None:
            raise BadWeightsFile(str(path), f"invalid checkpoint: {problem}")
    return checkpoint


def _rng_problem(rng: dict[str, Any]) -> str | None:
    """What ``restore_rng_state`` would trip over, as a clause."""
    expected = {"torch", "data", "numpy", "python"}
    if set(rng) != expected:
        return f"'rng' has {', '.join(sorted(map(str, rng))) or 'no'} states, expected {', '.join(sorted(expected))}"
    for name in ("torch", "data"):
        if not isinstance(rng[name], torch.Tensor) or rng[name].dtype != torch.uint8:
            return f"'rng.{name}' is not a uint8 generator state"
    numpy_state, python_state = rng["numpy"], rng["python"]
    if not (
        isinstance(numpy_state, dict)
        and isinstance(numpy_state.get("keys"), torch.Tensor)
        and numpy_state["keys"].shape == (624,)
        and all(isinstance(numpy_state.get(k), t) for k, t in (("kind", str), ("position", int), ("has_gauss", int),
                                                                 ("cached_gaussian", float)))
    ):
        return "'rng.numpy' is not a NumPy MT19937 state"
    if not (
        isinstance(python_state, dict)
        and isinstance(python_state.get("version"), int)
        and isinstance(python_state.get("state"), (list, tuple))
        and len(python_state["state"]) == 625
        and all(isinstance(v, int) for v in python_state["state"])
    ):
        return "'rng.python' is not a Python random state"
    return None


def _optimizer_problem(optimizer: dict[str, Any]) -> str | None:
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        return "'optimizer' is not an optimizer state (state and param_groups)"
    return None
