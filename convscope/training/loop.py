"""The training loop: ``train(TrainConfig) -> TrainResult``, epoch after epoch.

A run is built in steps, each in its own module: the options are resolved and checked
(``config``), the run folder is checked (``runrecord``) and the run built (``state.build_run``),
restored or started (``rundir``), and then this module runs the epochs, saving after each
(``rundir.save_epoch``; the folder's layout is described there). The learning rate is set per step
(``schedule``).

Honest model selection: ``best.pt`` is chosen on a validation split only: the data's own, or one
held out of the training images (``load_training_data``'s default: 10% of Fashion-MNIST and digits,
20% of a folder). The test split is never looked at during training; once the last epoch is done,
``best.pt`` is loaded like any user would load it and scored on the test split, and that is the test
accuracy reported. With ``val_split=0`` there is nothing to choose on, and ``best.pt`` is the last
epoch.

Every checkpoint is sealed with a checksum and verified when read (``convscope.models.checkpoints``).
Training stops with ``TrainingDiverged`` at the first non-finite loss, before anything of that step
is saved: ``last.pt``, ``best.pt`` and ``metrics.jsonl`` keep the last good epoch.

Distributed training: under ``torchrun`` (``torchrun --nproc-per-node N -m convscope train ...``)
every process trains a ``DistributedDataParallel`` replica (gloo on CPU, nccl on CUDA; see
``convscope.distributed``). ``batch_size`` is the GLOBAL batch: each step, every rank draws the same
seeded permutation and global batch a one-process run would (``epoch_batches``), trains on its
contiguous share of it (``rank_share``), and weights its loss so that the averaged gradient is the
gradient of the global batch's mean loss. BatchNorm normalises with the global batch's statistics
and Dropout keeps this rank's rows of the global batch's mask (``World.global_batch``), so a run
computes what one process would, up to floating-point summation order. Train and validation
numbers are summed over the ranks; rank 0 alone writes files. Resuming reads the same ``last.pt``
on every rank, with any number of processes.

Determinism: one seed drives the model's initialisation, a data generator (epoch order,
augmentation) and the global RNG (dropout). Their states go into ``last.pt`` at the end of every
epoch, so a run killed at any moment and resumed with ``resume=True`` retraces the uninterrupted
run exactly (same thread count and device assumed).

Extending: resuming with a larger ``epochs`` (``resume(run, epochs=N)``) continues a finished
or unfinished run to N epochs. The learning-rate schedule is defined over all epochs, and it is
re-planned over N: every remaining step gets the rate a run started with ``epochs=N`` has at that
step. For a finished ``onecycle``/``cosine`` run that raises the rate again (a warm restart) and
decays it to the floor by epoch N; resuming the extended run later retraces it exactly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convscope.distributed import init_from_env, shard_range
from convscope.errors import BadArgument, TrainingDiverged
from convscope.training.batches import epoch_batches, rank_share
from convscope.training.config import (
    TrainConfig,
    check_resume_arch,
    check_resume_data,
    check_resume_options,
    load_run_config,
    read_last,
    resolve_config,
)
from convscope.training.data import Split, data_fingerprint
from convscope.training.evaluate import autocast_for, evaluate_split
from convscope.training.rundir import (
    RunFolder,
    check_new_run_folder,
    open_record,
    restore,
    save_epoch,
    save_snapshot,
    write_evolution,
    write_result,
)
from convscope.training.runrecord import inspect_run_folder
from convscope.training.schedule import learning_rate
from convscope.training.state import (
    RunState,
    TrainProgress,
    TrainProgressCallback,
    TrainResult,
    build_run,
    feature_evolution,
    seeded,
)
from convscope.training.transfer import grayscale_note
from convscope.training.wording import literal, option_error

__all__ = ["TrainConfig", "TrainProgress", "TrainResult", "load_run_config", "resume", "train"]


def train(
    config: TrainConfig, progress: TrainProgressCallback | None = None, *, overwrite: bool = False
) -> TrainResult:
    """Train (or fine-tune, or resume) a model; see ``convscope.training.rundir`` for the run folder.

    Args:
        overwrite: start a new run in a folder that holds an earlier run (its recorded files, and
            only those, are removed first) or files no convscope run wrote (left alone). See
            ``convscope.training.runrecord``.

    Returns:
        ``TrainResult`` with the history and the best epoch.

    Raises:
        RunFolderError: the folder holds an earlier run (without ``resume`` or ``overwrite``),
            files no run wrote (without ``overwrite``), or a file at a name the run writes that no
            run here wrote or that changed since (always).
        BadArgument: invalid options, nothing to resume, or resume options that differ from the
            run's.
        DataError: unusable data, or data that changed since the resumed run started.
        BadWeightsFile: ``last.pt`` is invalid or was not written as ``last.pt`` (a renamed
            ``best.pt``); ``DamagedWeightsFile`` when it changed after it was written.
        WeightsMismatch: resuming a run of another architecture.
        CheckpointWriteError: a checkpoint could not be written (the previous one is intact).
        TrainingDiverged: a non-finite loss or weights; the last good checkpoint is kept.
        UnknownModel: unknown architecture.
    """
    from convscope.models.load import resolve_device

    run_dir = Path(config.out_dir)
    last_path = run_dir / "last.pt"
    saved: dict[str, Any] | None = None
    contents = inspect_run_folder(run_dir)
    if config.resume:
        saved = read_last(run_dir)
        check_resume_arch(config, saved, last_path)
        # last.pt has just been verified on its own terms (checksum, role, fields).
        contents.refuse_foreign_run_names(allowed=("last.pt",))
    else:
        contents.refuse_foreign_run_names()
        check_new_run_folder(contents, overwrite)
    config = resolve_config(config)
    if saved is not None:
        check_resume_options(config, saved, last_path)
    fingerprint = data_fingerprint(config.data)
    if saved is not None:
        check_resume_data(config, contents.record.payload.get("data") if contents.record is not None else None,
                          fingerprint)
    device = resolve_device(config.device)
    with init_from_env(device) as world:
        if world.backend == "nccl":
            device = world.device  # this rank's GPU, not cuda:0 for all
        if config.batch_size < 2 * world.size:
            raise option_error(
                BadArgument, f"{{batch_size}} {config.batch_size}",
                f"is the global batch; {world.size} processes need at least {2 * world.size} (2 per process for BatchNorm)",
            )
        # Every rank has read last.pt and checked the options before rank 0 writes anything.
        world.barrier()
        with seeded(config, device):
            state = build_run(config, device, world, progress)
            return _run(state, saved, RunFolder(contents, fingerprint))


def resume(
    run_dir: str | os.PathLike[str], progress: TrainProgressCallback | None = None, *, device: str | None = None,
    epochs: int | None = None,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its ``last.pt`` with the options it was started with.

    Args:
        epochs: extend the run (finished or not) to this many epochs; the learning-rate schedule is
            re-planned over them (see ``config.check_resume_options``). Default: the run's own.

    Raises:
        BadArgument: ``epochs`` below the epochs already trained (and as ``train``).
    """
    config = replace(load_run_config(run_dir), out_dir=str(run_dir), resume=True)
    if device is not None:
        config = replace(config, device=device)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    return train(config, progress)


def _run(state: RunState, saved: dict[str, Any] | None, folder: RunFolder) -> TrainResult:
    """Restore or start the run folder, run the remaining epochs, score ``best.pt`` and write the result."""
    config, world = state.config, state.world
    if saved is not None:
        restore(state, saved)
    if world.is_rank0:
        state.record = open_record(state, saved, folder)
        state.evolution = feature_evolution(state)
    if state.evolution is not None and 0 in config.snapshot_epochs and state.start_epoch == 0:
        state.notify(TrainProgress("snapshot", 0, config.epochs, 0, 1))
        save_snapshot(state, 0)

    started = time.perf_counter()
    # The DDP wrapper is built after the restore, so every rank starts from the same weights (it
    # also broadcasts rank 0's); BatchNorm and Dropout act on the global batch, as in one process.
    with world.global_batch(state.module):
        trainer = world.data_parallel(state.module)
        for epoch in range(state.start_epoch + 1, config.epochs + 1):
            _epoch(state, trainer, epoch)

    test = None
    if state.data.test is not None and world.is_rank0:
        state.notify(TrainProgress("eval", config.epochs, config.epochs, 0, len(state.data.test)))
        test = _test_best(state)
    # Rank 0 read best.pt back; the others return its numbers too.
    test = world.all_gather_object(test)[0]
    pictures = write_evolution(state.record) if config.snapshot_epochs and state.record is not None else None
    module = state.module
    result = TrainResult(
        run_dir=state.run_dir,
        config=config,
        history=tuple(state.history),
        best_epoch=int(state.best["epoch"]),
        best=state.best,
        selection=state.selection,
        parameters=sum(p.numel() for p in module.parameters()),
        trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
        skipped=state.data.skipped,
        resumed_from=state.resumed_from,
        evolution=pictures[0] if pictures else None,
        data=state.data.describe(),
        test=test,
        world_size=world.size,
        notes=tuple(n for n in (grayscale_note(config.data, state.loaded.preprocess, config.arch or ""),) if n),
        head=state.head,
        frozen=_frozen_record(state),
    )
    if state.record is not None:
        write_result(state.record, result, state.variant, time.perf_counter() - started)
    return result


def _frozen_record(state: RunState) -> dict[str, Any] | None:
    """What ``freeze`` fixed, for ``result.json`` and the command's output (``None``: nothing)."""
    frozen = state.frozen
    if frozen.mode == "none":
        return None
    return {**frozen.record(state.module), "description": frozen.describe(state.module)}


def _epoch(state: RunState, trainer: nn.Module, epoch: int) -> None:
    """Train one epoch, validate, take a snapshot if asked, choose ``best.pt`` and save (rank 0)."""
    config, data = state.config, state.data
    epoch_started = time.perf_counter()
    metrics = _train_epoch(state, trainer, epoch)
    train_seconds = time.perf_counter() - epoch_started
    if data.val is not None:
        state.notify(TrainProgress("eval", epoch, config.epochs, 0, len(data.val)))
        metrics["val_loss"], metrics["val_accuracy"] = _evaluate_shared(state, data.val)
    _check_finite(state, metrics, epoch)
    metrics["images_per_second"] = metrics.pop("_seen") / train_seconds if train_seconds > 0 else None
    metrics["epoch_seconds"] = time.perf_counter() - epoch_started
    if state.evolution is not None and epoch in config.snapshot_epochs:  # rank 0 only
        state.notify(TrainProgress("snapshot", epoch, config.epochs, 0, 1))
        save_snapshot(state, epoch)
    state.history.append(metrics)
    # Validation accuracy alone picks best.pt; without a validation split, the latest epoch.
    best = state.best
    improved = state.selection == "last" or "val_accuracy" not in best or metrics["val_accuracy"] > best["val_accuracy"]
    if improved:
        state.best = dict(metrics)
    if state.record is not None:
        save_epoch(state, epoch, metrics, improved)
    state.notify(TrainProgress("epoch", epoch, config.epochs, epoch, config.epochs, metrics=metrics))


def _train_epoch(state: RunState, trainer: nn.Module, epoch: int) -> dict[str, Any]:
    """One pass over the training split; returns the epoch's train metrics (and ``_seen`` images).

    ``trainer`` is the module to step (the DDP wrapper under torchrun). Every rank walks the same
    global batches and trains on its share; the metrics are over the global batches.

    Raises:
        TrainingDiverged: a step's loss is not finite (raised on every rank, before that step
            updates anything).
    """
    config, world, data, transform = state.config, state.world, state.data, state.transform
    generator, optimizer, device = state.data_generator, state.optimizer, state.device
    trainer.train()
    state.frozen.hold_eval(state.module)
    batches = epoch_batches(len(data.train), config.batch_size, generator)
    steps = len(batches)
    total_steps = steps * config.epochs
    # Augmentation draws per image from the shared generator: a rank augments the whole global
    # batch and keeps its share, so the generator (and every image's augmentation) follows a
    # one-process run. Without augmentation a rank converts its share only.
    whole_batch = world.distributed and bool(transform.augment)
    totals = torch.zeros(2, dtype=torch.float64)  # loss sum, correct
    seen = 0
    lr = 0.0
    for step, batch in enumerate(batches):
        index = rank_share(batch, world.rank, world.size)
        if whole_batch:
            share = shard_range(len(batch), world.rank, world.size)
            x = transform(data.train.images[batch], generator)[share.start : share.stop]
        else:
            x = transform(data.train.images[index], generator)
        x = x.to(device, non_blocking=True)
        y = data.train.labels[index].to(device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = learning_rate(config, (epoch - 1) * steps + step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast_for(device, config.precision):
            logits = trainer(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        # DDP averages gradients over the ranks; weighting each rank's mean by its share of the
        # global batch makes that average the gradient of the global batch's mean loss (the weight
        # is exactly 1.0 in a one-process run).
        weighted = loss * (len(index) * world.size / len(batch))
        with torch.no_grad():
            local = torch.stack([loss.detach().double().cpu() * len(index), (logits.argmax(dim=1) == y).sum().double().cpu()])
        step_totals = world.all_reduce_sum(local)
        step_loss = step_totals[0] / len(batch)
        if not bool(torch.isfinite(step_loss)):
            raise _diverged(state, epoch, f"the loss became {float(step_loss)} at step {step + 1} of {steps}")
        optimizer.zero_grad(set_to_none=True)
        weighted.backward()
        optimizer.step()
        totals += step_totals
        seen += len(batch)
        if state.progress is not None:
            state.progress(
                TrainProgress(
                    "train", epoch, config.epochs, step + 1, steps, float(totals[0]) / seen, float(totals[1]) / seen
                )
            )
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": float(totals[0]) / seen,
        "train_accuracy": int(totals[1]) / seen,
        "_seen": seen,
    }


def _evaluate_shared(state: RunState, split: Split) -> tuple[float, float]:
    """``(loss, accuracy)`` of the network on ``split``, each rank scoring its contiguous share."""
    world, module, config = state.world, state.module, state.config
    options: dict[str, Any] = {"batch_size": max(256, config.batch_size), "precision": config.precision}
    if not world.distributed:
        scores = evaluate_split(module, split, state.transform, state.data.categories, **options)
        return scores.loss, scores.accuracy
    share = shard_range(len(split), world.rank, world.size)
    local = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    if len(share):
        part = split.subset(torch.arange(share.start, share.stop))
        scores = evaluate_split(module, part, state.transform, state.data.categories, **options)
        local = torch.tensor(
            [scores.loss * scores.count, float(scores.confusion.diag().sum()), scores.count], dtype=torch.float64
        )
    total = world.all_reduce_sum(local)
    return float(total[0] / total[2]), float(total[1] / total[2])


def _check_finite(state: RunState, metrics: dict[str, Any], epoch: int) -> None:
    """Refuse to save an epoch whose weights or scores are not finite (the last step can still overflow)."""
    module = state.module
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _diverged(state, epoch, f"{name} holds non-finite values after the last step")
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _diverged(state, epoch, f"the {key.replace('_', ' ')} is {value}")


def _diverged(state: RunState, epoch: int, what: str) -> TrainingDiverged:
    config = state.config
    kept = (
        f"last.pt keeps epoch {epoch - 1}, the last good one" if epoch > 1 else "no checkpoint was written"
    )
    hint = f"try an {{lr}} below {config.lr:g}"
    if config.precision == "bf16":
        hint += ", or {precision} fp32"
    return option_error(
        TrainingDiverged, literal(state.run_dir), literal(f"training diverged in epoch {epoch}: {what}; stopped, {kept}"),
        hint,
    )


def _test_best(state: RunState) -> dict[str, Any]:
    """Score ``best.pt`` on the test split, loaded as a user would load it (float32, no augmentation)."""
    from convscope.models.load import load_model
    from convscope.training.checkpoint import read_checkpoint

    data = state.data
    assert data.test is not None
    path = state.run_dir / "best.pt"
    chosen = load_model(weights=path, device=str(state.device))
    epoch = int(read_checkpoint(path)["epoch"])
    scores = evaluate_split(
        chosen.module, data.test, state.transform, data.categories, batch_size=max(256, state.config.batch_size)
    )
    return {"accuracy": scores.accuracy, "loss": scores.loss, "count": scores.count, "epoch": epoch,
            "checkpoint": "best.pt"}
