"""A training run's folder: starting it, saving each epoch, restoring, repair after a kill, the result.

A run folder holds::

    run.json              the record of the run: its id, the data's fingerprint and the sha256 of
                          every file it wrote (``convscope.training.runrecord``): a new run into
                          the folder replaces only those, and only with ``overwrite``
    config.json           resolved options
    data.json             dataset sizes, classes and skipped files
    metrics.jsonl         one JSON line per finished epoch (rewritten from the checkpoint, so it
                          always matches it)
    last.pt               checkpoint after every epoch: weights, optimizer, RNG states, history
    best.pt               the epoch with the best validation accuracy (inference only)
    snapshots/            feature-evolution snapshots (``snapshot_epochs``): ``epoch_NNN.pt`` and
                          its picture ``epoch_NNN.png``
    evolution.png, filters_evolution.png
    result.json           written last: best epoch, its validation numbers, and the test accuracy
                          of best.pt

Rank 0 writes every file, through the run's ``RunRecord``, which records each file's checksum
before writing it. Each epoch writes ``last.pt`` first: it is what a resume reads, and ``best.pt``
and ``metrics.jsonl`` are derived from it, so a kill between the writes is repaired from
``last.pt`` when the run resumes (``repair_after_kill``).

``runrecord`` is the record itself (``run.json``, which files are whose): the ablation tables keep
one too. This module is what a training run puts in its folder, and when.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convscope.atomic import remove_stale_temps
from convscope.distributed import shard_range
from convscope.errors import ConvscopeError
from convscope.models.checkpoints import seal
from convscope.training.checkpoint import (
    checkpoint_bytes,
    make_checkpoint,
    read_checkpoint,
    restore_rng_state,
    rng_state,
    write_checkpoint,
)
from convscope.training.runrecord import FolderContents, RunFolderError, RunRecord
from convscope.training.snapshots import SNAPSHOT_FOLDER, load_snapshots, snapshot_path
from convscope.training.state import RunState, TrainResult
from convscope.training.wording import literal


@dataclass(frozen=True)
class RunFolder:
    """What ``train`` found in the run folder, and the data's fingerprint (``data.data_fingerprint``).

    Attributes:
        contents: the folder's files, sorted by who wrote them (``runrecord.inspect_run_folder``).
        fingerprint: the training data's fingerprint now.
    """

    contents: FolderContents
    fingerprint: dict[str, Any]


def check_new_run_folder(contents: FolderContents, overwrite: bool) -> None:
    """Refuse to start a new run in a folder holding an earlier run or others' files, unless ``overwrite``.

    Raises:
        RunFolderError: an earlier run, or files no convscope run wrote, without ``overwrite``.
    """
    if contents.has_earlier_run and not overwrite:
        raise RunFolderError(
            str(contents.folder),
            f"holds an earlier run ({literal(contents.describe())}); "
            "use {resume} to continue it or {overwrite} to replace it",
        )
    if contents.foreign_other and not overwrite:
        shown = ", ".join(contents.foreign_other[:4]) + (", ..." if len(contents.foreign_other) > 4 else "")
        raise RunFolderError(
            str(contents.folder),
            f"holds files no convscope run wrote ({literal(shown)}); "
            "use {overwrite} to train beside them (they are left alone)",
        )


def restore(state: RunState, saved: dict[str, Any]) -> None:
    """Put a verified ``last.pt`` back: weights, optimizer state, every RNG, history and best epoch.

    Raises:
        WeightsMismatch: its weights do not fit the network.
        BadWeightsFile: its optimizer state does not fit the network.
    """
    from convscope.errors import BadWeightsFile
    from convscope.models.weights import load_state_dict_strict

    path = state.run_dir / "last.pt"
    load_state_dict_strict(state.module, saved["state_dict"], source=str(path), model_name=state.config.arch or "")
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BadWeightsFile(
            str(path), f"invalid checkpoint: its optimizer state does not fit this model ({exc})"
        ) from exc
    restore_rng_state(saved["rng"], state.data_generator)
    state.history = list(saved["history"])
    state.best = dict(saved["best"])
    state.resumed_from = int(saved["epoch"])


def open_record(state: RunState, saved: dict[str, Any] | None, folder: RunFolder) -> RunRecord:
    """Start the run's record (rank 0): a new run's first files, or a resumed run's repair.

    A new run removes the earlier run's recorded files first (``train`` has checked that it may:
    with ``overwrite``, or only an old ``run.json``); nothing else is removed.
    """
    config, run_dir = state.config, state.run_dir
    if saved is not None:
        record = _resumed_record(run_dir, folder, config.epochs)
        repair_after_kill(record, saved)
        if saved["config"].get("epochs") != config.epochs:
            record.write("config.json", json.dumps(config.to_json(), indent=2) + "\n")
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in folder.contents.earlier:
        (run_dir / name).unlink(missing_ok=True)
    record = RunRecord.start(run_dir, command="train", epochs=config.epochs, epoch=0, data=folder.fingerprint)
    record.write("config.json", json.dumps(config.to_json(), indent=2) + "\n")
    record.write("data.json", json.dumps(state.data.describe(), indent=2) + "\n")
    return record


def _resumed_record(run_dir: Path, folder: RunFolder, epochs: int) -> RunRecord:
    """The resumed run's record; a run from before ``run.json`` gets one with its files now."""
    record = folder.contents.record
    if record is None:
        record = RunRecord.start(run_dir, command="train", epochs=epochs, data=folder.fingerprint)
        record.adopt(folder.contents.earlier)
    elif not isinstance(record.payload.get("data"), dict):
        record.update(data=folder.fingerprint)
    record.update(epochs=epochs)
    return record


def repair_after_kill(record: RunRecord, saved: dict[str, Any]) -> None:
    """A kill between writing last.pt and best.pt/metrics.jsonl leaves those one epoch behind."""
    run_dir = record.folder
    # SIGKILL can leave the hidden temporary file of an atomic write behind (never a final name);
    # only convscope's own, of dead processes, are removed.
    for folder in (run_dir, run_dir / SNAPSHOT_FOLDER):
        remove_stale_temps(folder)
    epoch = int(saved["epoch"])
    best_path = run_dir / "best.pt"
    if saved["best"].get("epoch") == epoch:
        try:
            stale = read_checkpoint(best_path)["epoch"] != epoch
        except ConvscopeError:
            stale = True
        if stale:
            payload = checkpoint_bytes(seal({**saved, "optimizer": None, "rng": None, "role": "best"}))
            record.expect({"best.pt": payload})
            write_checkpoint(best_path, payload)
    record.write("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in saved["history"]))


def save_epoch(state: RunState, epoch: int, metrics: dict[str, Any], improved: bool) -> None:
    """Write ``last.pt``, ``best.pt`` (when ``improved``) and ``metrics.jsonl`` after ``epoch`` (rank 0)."""
    from convscope.imageio import atomic_write

    record = state.record
    assert record is not None  # rank 0, which holds the record, saves
    loaded = state.loaded
    common: dict[str, Any] = {
        "arch": loaded.name,
        "state_dict": loaded.module.state_dict(),
        "categories": loaded.categories,
        "preprocess": loaded.preprocess,
        "epoch": epoch,
        "config": state.config.to_json(),
        "metrics": metrics,
        "history": state.history,
        "best": state.best,
        "variant": state.variant,
    }
    run_dir = record.folder
    files = {"last.pt": checkpoint_bytes(
        make_checkpoint(
            **common, optimizer=state.optimizer.state_dict(), rng=rng_state(state.data_generator), role="last"
        )
    )}
    if improved:
        files["best.pt"] = checkpoint_bytes(make_checkpoint(**common, role="best"))
    files["metrics.jsonl"] = "".join(json.dumps(m, allow_nan=False) + "\n" for m in state.history).encode("utf-8")
    # Recorded before any is written, so a kill between the writes leaves files the run still owns.
    record.expect(files, epoch=epoch)
    # last.pt first: it is what a resume reads; best.pt and metrics.jsonl are derived from it.
    write_checkpoint(run_dir / "last.pt", files["last.pt"])
    if improved:
        write_checkpoint(run_dir / "best.pt", files["best.pt"])
    atomic_write(run_dir / "metrics.jsonl", files["metrics.jsonl"])


def save_snapshot(state: RunState, epoch: int) -> Path:
    """Record the features now and write ``snapshots/epoch_NNN.pt`` and its picture ``epoch_NNN.png`` (rank 0)."""
    from convscope.imageio import png_bytes
    from convscope.render.training import snapshot_picture

    record = state.record
    assert record is not None and state.evolution is not None  # rank 0 takes the snapshots
    snapshot = state.evolution.record(epoch)
    buffer = io.BytesIO()
    torch.save(snapshot.to_dict(), buffer)
    path = record.write(snapshot_path(record.folder, epoch), buffer.getvalue())
    record.write(snapshot_path(record.folder, epoch, ".png"), png_bytes(snapshot_picture(snapshot)))
    return path


def write_evolution(record: RunRecord) -> tuple[Path, Path] | None:
    """Render ``evolution.png`` and ``filters_evolution.png`` from the stored snapshots.

    Returns:
        the two paths, or ``None`` when the run has no snapshots.
    """
    from convscope.imageio import png_bytes
    from convscope.render.training import evolution_picture, filters_evolution_picture

    snapshots = load_snapshots(record.folder)
    if not snapshots:
        return None
    return (
        record.write("evolution.png", png_bytes(evolution_picture(snapshots))),
        record.write("filters_evolution.png", png_bytes(filters_evolution_picture(snapshots))),
    )


def write_result(record: RunRecord, result: TrainResult, variant: str | None, elapsed: float) -> None:
    """Write ``result.json``, the run's last file."""
    batch = min(result.config.batch_size, int(result.data["splits"]["train"]))
    payload = {
        "arch": result.config.arch,
        "variant": variant,
        "head": result.head,
        "frozen": result.frozen,
        "best_epoch": result.best_epoch,
        "selection": result.selection,
        "validation": result.data.get("validation"),
        "best": result.best,
        "test": None if result.test is None else {
            **result.test,
            "note": "measured once, on best.pt after training; the test split chose nothing",
        },
        "final": result.history[-1],
        "parameters": result.parameters,
        "trainable_parameters": result.trainable,
        "skipped_images": len(result.skipped),
        "world_size": result.world_size,
        "batch_size": {
            "global": result.config.batch_size,
            "per_process": [len(shard_range(batch, rank, result.world_size)) for rank in range(result.world_size)],
            "meaning": "images per optimizer step over all processes (-b is the global batch)",
        },
        "notes": list(result.notes),
        "elapsed_seconds_this_process": elapsed,
    }
    record.write("result.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
