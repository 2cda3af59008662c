"""Training checkpoints: plain dicts of tensors and Python literals, written atomically.

A checkpoint loads with ``torch.load(weights_only=True)`` and with ``convscope.load_model(weights=PATH)``
(the model loader reads ``arch``, ``state_dict``, ``categories`` and ``preprocess``)::

    {"format": "convscope-checkpoint", "version": 1, "arch": "zfnet_mnist",
     "state_dict": {...}, "categories": [...], "preprocess": {"resize", "crop", "mean", "std", "channels"},
     "epoch": 3, "optimizer": {...} | None, "rng": {...} | None, "metrics": {...}, "history": [...],
     "best": {...}, "config": {...}, "variant": None | "drop:conv3"}

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

from convscope.errors import BadWeightsFile, ConvscopeError
from convscope.models.weights import CHECKPOINT_FORMAT, is_checkpoint, read_weights_file
from convscope.preprocess import Preprocess

CHECKPOINT_VERSION = 1


class CheckpointWriteError(ConvscopeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


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
) -> dict[str, Any]:
    """Assemble a checkpoint dict (tensors are detached CPU copies)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
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
    }


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
            ``path`` is untouched and no temporary file is left.
    """
    from convscope.imageio import atomic_path

    payload = data if isinstance(data, bytes) else checkpoint_bytes(data)
    target = Path(path)
    try:
        with atomic_path(target) as temp, open(temp, "wb") as handle:
            _write(handle, payload)
            handle.flush()
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ENOSPC:
            why = "no space left on device"
        kept = "the previous checkpoint is intact" if target.exists() else "nothing was written"
        raise CheckpointWriteError(
            str(target), f"cannot write checkpoint: {why.lower()}; {kept}",
            "free space and rerun with --resume",
        ) from exc
    return target


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a convscope checkpoint safely (``weights_only``).

    Raises:
        WeightsUnavailable: no such file.
        BadWeightsFile: unreadable, not a convscope checkpoint, or of a newer version.
    """
    checkpoint = read_weights_file(path)
    if not is_checkpoint(checkpoint):
        raise BadWeightsFile(str(path), "is a plain weights file, not a convscope training checkpoint")
    version = checkpoint.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise BadWeightsFile(
            str(path), f"checkpoint version {version!r} is newer than this convscope reads ({CHECKPOINT_VERSION})",
            "upgrade convscope",
        )
    return checkpoint
