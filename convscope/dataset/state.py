"""The dataset miner's resume state: its folder (marked as convscope's own, never a user's), the
checkpoint of each rank, and the identity of the run it may continue (settings, weights, images).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convscope.atomic import atomic_write, os_reason, remove_stale_temps
from convscope.dataset.sources import tensor_digest
from convscope.dataset.topk import TopkTable
from convscope.distributed import World
from convscope.errors import BadArgument, OutputError

STATE_VERSION = 2  # 2: the weights' and the images' digests are recorded and checked
STATE_MARKER = "convscope-patches-state.json"
_MARKER_KIND = "convscope patches state"
# The miner's checkpoints, and the atlas's feature-visualisation chunks (``dataset.atlas.chunk_name``).
_STATE_NAME = re.compile(
    r"state-rank[0-9]+-of-[0-9]+\.pt|featurevis-[0-9]+-(?:featurevis|negative)-[0-9]+\.pt", re.ASCII)


@dataclass(frozen=True)
class MinerState:
    """What a checkpoint holds: where the pass is and what it found so far."""

    position: int
    images: int
    skipped: tuple[tuple[int, str], ...]
    tables: dict[str, TopkTable]
    stats: dict[str, torch.Tensor] | None = None  # layer -> (C, 3) running statistics, when measured


def state_path(folder: str | Path, world: World) -> Path:
    """The checkpoint file of this rank (one per rank: each checkpoints its own shard)."""
    return Path(folder) / f"state-rank{world.rank}-of-{world.size}.pt"


def state_files(processes: int) -> list[str]:
    """The checkpoint file names of a run on ``processes`` ranks."""
    return [state_path(".", World(rank=rank, size=processes)).name for rank in range(processes)]


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder ``claim_state_folder`` made, or ``None`` (missing, not ours, damaged)."""
    marker = folder / STATE_MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        payload = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(payload, dict) or payload.get("kind") != _MARKER_KIND or not isinstance(payload.get("run"), str)
            or not isinstance(payload.get("files"), list) or not all(isinstance(f, str) for f in payload["files"])):
        return None
    return payload


def claim_state_folder(folder: str | Path, *, processes: int = 1, resume: bool = False,
                       files: Sequence[str] = ()) -> str:
    """Make ``folder`` a checkpoint folder of this run, marked as convscope's; check before any work.

    A missing folder is created with a marker (``STATE_MARKER``) holding a new run id and the
    names of the state files the run's ``processes`` ranks will write. A folder an earlier run
    marked is taken over (its run id kept on ``resume``); its marker then lists the files of both.
    Anything else of that name (a user's folder, a file, a link) is refused and left as it is.

    Args:
        files: further state file names the run will write (the atlas's chunks); only names of
            the state patterns are ever removed.

    Returns:
        the run id recorded in the marker.

    Raises:
        OutputError: ``<folder>: exists and was not made by convscope ...``.
    """
    folder = Path(folder)
    subject = str(folder)
    hint = "move it away, or write to another -o folder"
    names = sorted({*state_files(processes), *files})
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        raise OutputError(subject, "exists and was not made by convscope (it is not a folder); it is left as it is",
                          hint)
    if folder.is_dir():
        marker = _read_marker(folder)
        if marker is None:
            raise OutputError(subject, f"exists and was not made by convscope (no {STATE_MARKER} in it); "
                              "it is left as it is", hint)
        run = marker["run"] if resume else uuid.uuid4().hex
        names = sorted({*marker["files"], *names})
    else:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(subject, f"cannot create the folder: {os_reason(exc)}") from exc
        run = uuid.uuid4().hex
    payload = {"kind": _MARKER_KIND, "version": STATE_VERSION, "run": run, "files": names}
    atomic_write(folder / STATE_MARKER, json.dumps(payload, indent=2) + "\n")
    return run


def release_state_folder(folder: str | Path, *, only_if_unused: bool = False) -> list[str]:
    """Remove what ``claim_state_folder`` runs put in ``folder``, then the folder when it is empty.

    Only a marked folder is touched, and in it only the state files its marker lists (regular
    files, not links), the temporary files of writers that are gone, and the marker. Anything
    else stays, and so do the folder and its marker (it is still convscope's to reuse).

    Args:
        only_if_unused: do nothing when any listed state file exists (a run that failed before
            its first checkpoint leaves no empty folder; one that saved a state keeps it).

    Returns:
        the names of the entries left in the folder that are not convscope's (``[]`` when the
        folder is gone, or is not convscope's and so was not looked into).
    """
    folder = Path(folder)
    marker = _read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if marker is None:
        return []
    # Only names of the miner's own pattern, whatever a damaged marker says.
    states = [folder / name for name in marker["files"] if _STATE_NAME.fullmatch(name)]
    if only_if_unused and any(os.path.lexists(path) for path in states):
        return []
    for path in states:
        if path.is_file() and not path.is_symlink():
            path.unlink()
    remove_stale_temps(folder)
    others = sorted(entry.name for entry in os.scandir(folder) if entry.name != STATE_MARKER)
    if others:
        return others
    (folder / STATE_MARKER).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something arrived meanwhile: it stays
        return sorted(entry.name for entry in os.scandir(folder))
    return []


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 hex digest of a module's state dict: every name, dtype, shape and value, in order."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode() + b"\0")
        digest.update((tensor_digest(value) if isinstance(value, torch.Tensor) else repr(value)).encode())
    return digest.hexdigest()


def _mismatch(path: Path, key: str, old: Any, new: Any) -> str:
    """Why a checkpoint made with ``old`` cannot continue a run with ``new`` (one clause)."""
    if key == "weights_sha256":
        shown_old = old[:12] if isinstance(old, str) else repr(old)
        return f"the checkpoint {path} was made with other weights (sha256 {shown_old}, now {new[:12]})"
    if key == "images_sha256":
        return (f"the images changed since the checkpoint {path} was made "
                "(a file was added, removed, renamed or rewritten)")
    return f"the checkpoint {path} was made with other settings ({key}: {old!r}, now {new!r})"


def save_state(path: Path, config: dict[str, Any], state: MinerState) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "version": STATE_VERSION,
            "config": config,
            "position": state.position,
            "images": state.images,
            "skipped": [list(item) for item in state.skipped],
            "tables": {name: table.cpu() for name, table in state.tables.items()},
            **({"stats": {name: value.cpu() for name, value in state.stats.items()}} if state.stats is not None else {}),
        },
        buffer,
    )
    atomic_write(path, buffer.getvalue())


def load_state(path: Path, config: dict[str, Any], device: torch.device) -> MinerState:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is not ours or is damaged
        raise BadArgument("--resume", f"cannot read the checkpoint {path}: {type(exc).__name__}") from exc
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        raise BadArgument("--resume", f"{path} is not a convscope patches checkpoint of this version")
    old = raw.get("config", {})
    for key in [*config, *(key for key in old if key not in config)]:  # a key only the checkpoint has differs too
        value = config.get(key)
        if old.get(key) != value:
            raise BadArgument("--resume", _mismatch(path, key, old.get(key), value),
                              "run again without --resume to start over")
    tables = {
        name: TopkTable(t["values"].to(device), t["images"].to(device), t["cells"].to(device))
        for name, t in raw["tables"].items()
    }
    skipped = tuple((int(i), str(r)) for i, r in raw["skipped"])
    stats = None
    if config.get("statistics"):
        saved = raw.get("stats")
        if not isinstance(saved, dict) or set(saved) != set(tables):
            raise BadArgument("--resume", f"{path} holds no statistics", "run again without --resume to start over")
        stats = {name: value.to(device=device, dtype=torch.float64) for name, value in saved.items()}
    return MinerState(int(raw["position"]), int(raw["images"]), skipped, tables, stats)
