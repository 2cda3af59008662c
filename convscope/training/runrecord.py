"""The record of a run (``run.json``): which files a convscope run wrote, so nothing else is replaced.

A run folder is shared with whoever else writes there: a user's notes, an ``evaluate -o RUN/eval``,
a ``best.pt`` copied in from elsewhere. The rule (the same as ``cli/output.py``'s manifest): a file is
replaced only when a convscope run wrote it and it is unchanged since. ``run.json`` holds::

    {"format": "convscope-run", "schema_version": 1, "run_id": "<32 hex>", "command": "train",
     "started": "...", "epoch": 2, "epochs": 10,
     "data": {"kind": "folder", "unit": "image files", "count": 240, "sha256": "..."},
     "files": {"last.pt": {"sha256": "...", "previous": "..."}, ...}}

It is rewritten atomically *before* each batch of writes with the new files' checksums, keeping
each file's previous checksum: a run killed between the two still finds each file as either
version, so its files stay its own. ``data`` fingerprints the training data when the run started
(``data.data_fingerprint``): resuming on other data is refused.

A new run into a folder (``inspect_run_folder`` sorts what is there):

- the earlier run's files (recorded, unchanged): refused unless ``resume`` (continue it) or
  ``overwrite`` (those files, and only those, are removed before the new run writes);
- a file at a name a run writes (``best.pt``, ``config.json``...) that no run here wrote, or that
  changed since: refused, naming it, even with ``overwrite``;
- anything else (``notes.txt``, ``eval/``): refused unless ``overwrite``, then left alone.

Run folders from before ``run.json`` (``config.json`` and a verified ``last.pt``) count as a
convscope run; their files are recorded the first time the run is resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convscope.atomic import sha256_file
from convscope.errors import ConvscopeError, OutputError
from convscope.training.snapshots import SNAPSHOT_FOLDER
from convscope.training.wording import Naming, fill, literal, worded

RECORD_NAME = "run.json"
FORMAT = "convscope-run"
SCHEMA_VERSION = 1
# What a training run writes at the top of its folder (and everything under snapshots/).
RUN_NAMES = (RECORD_NAME, "config.json", "data.json", "metrics.jsonl", "last.pt", "best.pt", "result.json",
             "evolution.png", "filters_evolution.png")


class RunFolderError(OutputError):
    """A run folder holds an earlier run or files convscope did not write.

    The reason and hint are templates (``convscope.training.wording``) whose ``{resume}`` and
    ``{overwrite}`` name the options that would resolve it: parameters in the library
    (``resume=True``), flags from the CLI (``worded``).
    """

    def __init__(self, subject: str, template: str, hint: str | None = None) -> None:
        super().__init__(subject, fill(template), None if hint is None else fill(hint))
        self.templates = (literal(subject), template, hint)

    def worded(self, naming: Naming | Mapping[str, str]) -> RunFolderError:
        """The same error naming the options as ``naming`` says (``{"resume": "--resume", ...}``)."""
        return worded(self, naming)


class RunRecord:
    """The record of one run; rank 0 writes every file of the run through it."""

    def __init__(self, folder: Path, payload: dict[str, Any], name: str = RECORD_NAME) -> None:
        self.folder = folder
        self.payload = payload
        self.name = name

    @property
    def run_id(self) -> str:
        return str(self.payload.get("run_id", ""))

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.payload["files"]  # type: ignore[no-any-return]

    @classmethod
    def start(cls, folder: str | os.PathLike[str], *, command: str, name: str = RECORD_NAME,
              **fields: Any) -> RunRecord:
        """A new record (a new run id), written at once."""
        payload = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "run_id": uuid.uuid4().hex,
                   "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields, "files": {}}
        record = cls(Path(folder), payload, name)
        record._save()
        return record

    @classmethod
    def read(cls, folder: str | os.PathLike[str], name: str = RECORD_NAME) -> RunRecord | None:
        """The folder's record, or ``None`` (missing, unreadable, or not a convscope record)."""
        path = Path(folder) / name
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT
                and isinstance(payload.get("files"), dict)
                and all(isinstance(v, dict) for v in payload["files"].values())):
            return None
        return cls(Path(folder), payload, name)

    def owns(self, name: str) -> bool:
        """Whether ``name`` is a regular file this run wrote, unchanged since."""
        entry = self.files.get(name)
        path = self.folder / name
        if entry is None or path.is_symlink() or not path.is_file():
            return False
        return sha256_file(path) in (entry.get("sha256"), entry.get("previous"))

    def update(self, **fields: Any) -> None:
        self.payload.update(fields)
        self._save()

    def expect(self, files: Mapping[str, bytes], **fields: Any) -> None:
        """Record the files about to be written (and ``fields``), before writing any of them."""
        for name, data in files.items():
            old = self.files.get(name, {}).get("sha256")
            self.files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "previous": old}
        self.update(**fields)

    def write(self, path: str | os.PathLike[str], data: bytes | str) -> Path:
        """Record, then write ``path`` (a name in the folder, or a path under it) atomically."""
        from convscope.imageio import atomic_write

        payload = data.encode("utf-8") if isinstance(data, str) else data
        name = self.relative(path)
        self.expect({name: payload})
        return atomic_write(self.folder / name, payload)

    def writer(self) -> Callable[[Path, bytes], Path]:
        """``write`` as a ``(path, bytes) -> path`` function for code that takes a writer."""
        return lambda path, data: self.write(path, data)

    def relative(self, path: str | os.PathLike[str]) -> str:
        candidate = Path(path)
        if candidate.is_absolute() or candidate.parts[: len(self.folder.parts)] == self.folder.parts:
            candidate = candidate.relative_to(self.folder)
        return candidate.as_posix()

    def adopt(self, names: list[str] | tuple[str, ...]) -> None:
        """Record files already in the folder as this run's (a run from before ``run.json``)."""
        for name in names:
            self.files[name] = {"sha256": sha256_file(self.folder / name), "previous": None}
        self._save()

    def forget(self, names: list[str]) -> None:
        for name in names:
            self.files.pop(name, None)
        self._save()

    def _save(self) -> None:
        from convscope.imageio import atomic_write

        atomic_write(self.folder / self.name, json.dumps(self.payload, indent=2, allow_nan=False) + "\n")


@dataclass(frozen=True)
class FolderContents:
    """What a run folder holds, sorted by who wrote it.

    Attributes:
        folder: the folder.
        record: its ``run.json``, when it has a convscope one.
        legacy: a run from before ``run.json`` (``config.json`` and a verified ``last.pt``).
        earlier: the earlier run's files, as it wrote them (``run.json`` included).
        foreign_run_names: files at names a run writes that no run here wrote, or that changed.
        foreign_other: other entries no run wrote (top-level names; a folder counts as one).
        epoch: epochs the earlier run finished (``None``: unknown).
    """

    folder: Path
    record: RunRecord | None
    legacy: bool
    earlier: tuple[str, ...]
    foreign_run_names: tuple[str, ...]
    foreign_other: tuple[str, ...]
    epoch: int | None = None

    @property
    def has_earlier_run(self) -> bool:
        return any(name != RECORD_NAME for name in self.earlier)

    @property
    def finished(self) -> bool:
        return "result.json" in self.earlier

    def describe(self) -> str:
        """The earlier run in a few words: ``run 1a2b3c4d, epoch 2 of 10, interrupted``."""
        parts = []
        if self.record is not None:
            parts.append(f"run {self.record.run_id[:8]}")
        else:
            parts.append("a run from before run.json")
        epochs = self.record.payload.get("epochs") if self.record is not None else None
        if self.epoch is None and "last.pt" not in self.earlier:
            parts.append("no checkpoint" if "best.pt" not in self.earlier else "best.pt only")
        elif self.epoch is not None:
            parts.append(f"epoch {self.epoch}" + (f" of {epochs}" if epochs else ""))
        parts.append("finished" if self.finished else "interrupted")
        return ", ".join(parts)

    def refuse_foreign_run_names(self, allowed: tuple[str, ...] = ()) -> None:
        """Raise ``RunFolderError`` naming the first file at a run's name that no run here wrote."""
        foreign = [name for name in self.foreign_run_names if name not in allowed]
        if foreign:
            raise RunFolderError(
                str(self.folder / foreign[0]),
                "was not written by a convscope run (or changed since); it is left as it is",
                "move it away, or train into another folder",
            )


def inspect_run_folder(folder: str | os.PathLike[str]) -> FolderContents:
    """Sort what ``folder`` holds (see the module docstring); a missing folder holds nothing."""
    from convscope.imageio import is_temp_name
    from convscope.training.runlock import LOCK_NAME

    root = Path(folder)
    if not root.is_dir():
        return FolderContents(root, None, False, (), (), ())
    names: list[str] = []
    other: list[str] = []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name == LOCK_NAME or is_temp_name(name) or name.startswith(".convscope-probe-"):
            continue
        if name == SNAPSHOT_FOLDER and entry.is_dir() and not entry.is_symlink():
            names.extend(f"{SNAPSHOT_FOLDER}/{p.name}" for p in sorted(entry.iterdir()) if not is_temp_name(p.name))
        elif name in RUN_NAMES:
            names.append(name)
        else:
            other.append(name)
    record = RunRecord.read(root)
    legacy = False
    epoch = None
    if record is not None:
        ours = [n for n in names if n == RECORD_NAME or record.owns(n)]
        epoch = record.payload.get("epoch")
        if "last.pt" not in ours:
            epoch = None
    else:
        last = _legacy_last(root)
        legacy = last is not None and _legacy_config(root)
        ours = [n for n in names if legacy and _legacy_owns(root, n)]
        epoch = int(last["epoch"]) if legacy and last is not None else None
    owned = set(ours)
    return FolderContents(
        root, record, legacy, tuple(ours),
        tuple(n for n in names if n not in owned),
        tuple(n for n in other if not (record is not None and record.owns(n))),
        epoch,
    )


def _legacy_last(root: Path) -> dict[str, Any] | None:
    from convscope.training.checkpoint import read_checkpoint

    if not (root / "last.pt").is_file():
        return None
    try:
        return read_checkpoint(root / "last.pt", role="last")
    except ConvscopeError:
        return None


def _legacy_config(root: Path) -> bool:
    from convscope.training.config import TrainConfig

    try:
        TrainConfig.from_json(json.loads((root / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return False
    return True


def _legacy_owns(root: Path, name: str) -> bool:
    """In a run from before ``run.json``: the run's names, checkpoints verified by their checksum."""
    path = root / name
    if path.is_symlink() or not path.is_file() or name == RECORD_NAME:
        return False
    # Under snapshots/ a run writes only epoch_NNN.pt/.png; anything else there is somebody else's.
    if "/" in name and not re.fullmatch(rf"{re.escape(SNAPSHOT_FOLDER)}/epoch_[0-9]{{3,}}\.(pt|png)", name):
        return False
    if name.endswith(".pt") and "/" not in name:
        from convscope.training.checkpoint import read_checkpoint

        try:
            read_checkpoint(path)
        except ConvscopeError:
            return False
    return True
