"""The training loop: ``train(TrainConfig) -> TrainResult``.

A run folder holds::

    config.json           resolved options (written first)
    data.json             dataset sizes, classes and skipped files
    metrics.jsonl         one JSON line per finished epoch (rewritten from the checkpoint, so it
                          always matches it)
    last.pt               checkpoint after every epoch: weights, optimizer, RNG states, history
    best.pt               the epoch with the best validation accuracy (inference only)
    snapshots/            feature-evolution snapshots (--snapshot-epochs)
    evolution.png, filters_evolution.png
    result.json           written last: best epoch, its validation numbers, and the test accuracy
                          of best.pt

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

Extending: resuming with a larger ``epochs`` (``train --resume --epochs N``) continues a finished
or unfinished run to N epochs. The learning-rate schedule is defined over all epochs, and it is
re-planned over N: every remaining step gets the rate a run started with ``--epochs N`` has at that
step. For a finished ``onecycle``/``cosine`` run that raises the rate again (a warm restart) and
decays it to the floor by epoch N; resuming the extended run later retraces it exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convscope.distributed import World, init_from_env, shard_range
from convscope.errors import (
    BadArgument,
    BadWeightsFile,
    DataError,
    TrainingDiverged,
    WeightsMismatch,
)
from convscope.models.checkpoints import checkpoint_preprocess, seal
from convscope.preprocess import Preprocess
from convscope.training.checkpoint import (
    checkpoint_bytes,
    make_checkpoint,
    read_checkpoint,
    restore_rng_state,
    rng_state,
    write_checkpoint,
)
from convscope.training.data import (
    BatchTransform,
    Split,
    TrainingData,
    epoch_batches,
    load_training_data,
    parse_augment,
    rank_share,
)
from convscope.training.evaluate import autocast_for, evaluate_split
from convscope.training.transfer import FREEZE_MODES, Frozen, freeze_prefix, grayscale_note, replace_head
from convscope.types import LoadedModel

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
DEFAULT_LR = {"adamw": 3e-3, "adam": 1e-3, "sgd": 0.05}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "adam": 0.0, "sgd": 5e-4}
PRETRAINED = "pretrained"
PROBE_COUNT = 32
# Options that may differ when resuming (they do not change the computation's result; a new
# ``epochs`` re-plans the learning-rate schedule, see ``_check_resume_epochs``).
_RESUME_FREE = ("resume", "out_dir", "device", "epochs")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved as ``config.json`` once resolved).

    Attributes:
        data: ``"fashion-mnist"``, ``"digits"`` or a folder (see ``load_training_data``).
        out_dir: the run folder.
        arch: registry name; ``None`` with ``init_from`` a checkpoint takes the checkpoint's.
        epochs: passes over the training split.
        batch_size: images per optimizer step, over all processes of a distributed run (the
            global batch; each of N processes takes about batch_size / N of it). A last partial
            batch is dropped, so every step has the same size; a split smaller than one batch is
            one step.
        lr: peak learning rate (default per optimizer: adamw 3e-3, adam 1e-3, sgd 0.05).
        optimizer: ``adamw``, ``adam`` or ``sgd`` (Nesterov momentum 0.9).
        weight_decay: default per optimizer: adamw 0.05, adam 0, sgd 5e-4.
        schedule: ``onecycle`` (cosine warm-up over ``warmup`` of the steps, then cosine decay),
            ``cosine`` (decay only) or ``constant``; set per step.
        warmup: fraction of all steps spent warming up (``onecycle``).
        label_smoothing: cross-entropy label smoothing.
        augment: names from ``AUGMENTATIONS`` (``crop``, ``flip``, ``color``, ``erase``).
        seed: initialisation, data order, augmentation, dropout.
        val_split: fraction of training images held out to choose ``best.pt`` (default: 0.1 for
            Fashion-MNIST and digits, 0.2 for folders without ``val/``; ``0``: keep the last epoch).
            See ``load_training_data``.
        limit: cap every split at this many images.
        snapshot_epochs: epochs after which to record feature-evolution snapshots (0: before training).
        snapshot_channels: channels followed per conv stage in the snapshots.
        init_from: ``"pretrained"`` or a weights/checkpoint file to start from; its last ``Linear``
            is replaced by a fresh one for this dataset's classes (transfer).
        freeze: ``none``, ``features`` or ``all-but-last`` (see ``convscope.training.transfer``).
        variant: an ablation variant (``drop:conv3``, ``width:conv2=512``; see ``training.ablation``).
        precision: ``fp32`` or ``bf16`` (autocast; much faster on CPUs with AMX/AVX512-BF16).
        channels_last: NHWC memory format (often faster for CPU convolutions).
        device: ``auto``, ``cpu``, ``cuda``...
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        deterministic: ``torch.use_deterministic_algorithms`` during the run.
    """

    data: str
    out_dir: str
    arch: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float | None = None
    schedule: str = "onecycle"
    warmup: float = 0.25
    label_smoothing: float = 0.0
    augment: tuple[str, ...] = ()
    seed: int = 0
    val_split: float | None = None
    limit: int | None = None
    snapshot_epochs: tuple[int, ...] = ()
    snapshot_channels: int = 4
    init_from: str | None = None
    freeze: str = "none"
    variant: str | None = None
    precision: str = "fp32"
    channels_last: bool = False
    device: str = "auto"
    resume: bool = False
    deterministic: bool = True

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["augment"] = list(self.augment)
        out["snapshot_epochs"] = list(self.snapshot_epochs)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_json``; unknown keys are ignored.

        Raises:
            TypeError: ``raw`` is not a dict.
            ValueError: a missing required field or a value of the wrong type, as a short clause
                naming the field (callers add the file).
        """
        if not isinstance(raw, dict):
            raise TypeError(f"'config' is a {type(raw).__name__}, expected a dict of training options")
        values: dict[str, Any] = {}
        for option in fields(cls):
            if option.name not in raw:
                if option.default is MISSING:
                    raise ValueError(f"'config' lacks {option.name!r}")
                continue
            value = raw[option.name]
            if not _fits(value, str(option.type)):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise ValueError(
                    f"'config.{option.name}' is a {type(value).__name__} ({shown}), expected {option.type}"
                )
            values[option.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback receives.

    Attributes:
        phase: ``"load"`` (decoding a folder), ``"train"`` (after each step), ``"eval"``,
            ``"snapshot"``, or ``"epoch"`` (after an epoch, with its ``metrics``).
        epoch, epochs: current epoch (1-based) and total.
        step, steps: progress within the phase.
        loss, accuracy: running means over the epoch so far (``train`` phase).
        metrics: the finished epoch's metrics (``epoch`` phase).
    """

    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    accuracy: float | None = None
    metrics: dict[str, Any] | None = None


TrainProgressCallback = Callable[[TrainProgress], None]


def _fits(value: object, annotation: str) -> bool:
    """Whether a JSON value has the type a ``TrainConfig`` annotation names."""
    if value is None:
        return annotation.endswith("| None")
    kind = annotation.removesuffix(" | None")
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("tuple[str, ...]", "tuple[int, ...]"):
        item = str if kind == "tuple[str, ...]" else int
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        )
    raise AssertionError(f"TrainConfig field type {annotation!r} has no JSON check")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: the run folder.
        config: the resolved configuration.
        history: per-epoch metrics (as in ``metrics.jsonl``).
        best_epoch: epoch saved as ``best.pt``.
        best: that epoch's metrics (train and validation; never test).
        selection: how ``best.pt`` was chosen: ``val`` (best validation accuracy) or ``last``
            (no validation split: the last epoch).
        test: the test split's numbers for ``best.pt``, measured once after training
            (``accuracy``, ``loss``, ``count``, ``epoch``, ``checkpoint``), or ``None`` without a
            test split.
        parameters: total parameters; ``trainable``: those trained.
        skipped: ``(path, reason)`` of unreadable images.
        resumed_from: the epoch a resumed run continued from, else ``None``.
        evolution: the evolution picture, when snapshots were taken.
        world_size: processes that trained (this process's run; 1 without torchrun).
        notes: facts about the input a user should know (``grayscale_note``); also in
            ``result.json``.
    """

    run_dir: Path
    config: TrainConfig
    history: tuple[dict[str, Any], ...]
    best_epoch: int
    best: dict[str, Any]
    selection: str
    parameters: int
    trainable: int
    skipped: tuple[tuple[str, str], ...] = ()
    resumed_from: int | None = None
    evolution: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] | None = None
    world_size: int = 1
    notes: tuple[str, ...] = ()

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def test_accuracy(self) -> float | None:
        """Test accuracy of ``best.pt``, when the data has a test split."""
        return None if self.test is None else float(self.test["accuracy"])


# -- configuration ------------------------------------------------------------------------------


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Validate and fill defaults (lr, weight decay, arch from a checkpoint, canonical augment).

    Raises:
        BadArgument: a value that cannot work.
        UnknownModel: unknown architecture.
    """
    from convscope.models.registry import get_spec

    if config.epochs < 1:
        raise BadArgument(f"--epochs {config.epochs}", "must be at least 1")
    if config.batch_size < 2:
        raise BadArgument(f"--batch-size {config.batch_size}", "must be at least 2 (BatchNorm needs two images)")
    if config.optimizer not in OPTIMIZERS:
        raise BadArgument(f"--optimizer {config.optimizer}", "unknown optimizer", "choose from: " + ", ".join(OPTIMIZERS))
    if config.schedule not in SCHEDULES:
        raise BadArgument(f"--schedule {config.schedule}", "unknown schedule", "choose from: " + ", ".join(SCHEDULES))
    if config.precision not in PRECISIONS:
        raise BadArgument(f"--precision {config.precision}", "unknown precision", "choose from: fp32, bf16")
    if config.freeze not in FREEZE_MODES:
        raise BadArgument(f"--freeze {config.freeze}", "unknown freeze mode", "choose from: " + ", ".join(FREEZE_MODES))
    if config.freeze != "none" and not config.init_from:
        raise BadArgument(f"--freeze {config.freeze}", "freezing needs learned features to keep", "add --from CKPT or --from pretrained")
    if config.lr is not None and not (config.lr > 0 and math.isfinite(config.lr)):
        raise BadArgument(f"--lr {config.lr}", "must be a positive number")
    if config.weight_decay is not None and not config.weight_decay >= 0:
        raise BadArgument(f"--weight-decay {config.weight_decay}", "must be 0 or more")
    if not 0.0 <= config.warmup < 1.0:
        raise BadArgument(f"--warmup {config.warmup}", "must be at least 0 and below 1")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise BadArgument(f"--label-smoothing {config.label_smoothing}", "must be at least 0 and below 1")
    if config.snapshot_channels < 1:
        raise BadArgument(f"--snapshot-channels {config.snapshot_channels}", "must be at least 1")
    for epoch in config.snapshot_epochs:
        if not 0 <= epoch <= config.epochs:
            raise BadArgument(f"--snapshot-epochs {epoch}", f"must be between 0 (before training) and --epochs {config.epochs}")
    arch = config.arch
    if config.init_from and config.init_from != PRETRAINED:
        arch = _checkpoint_arch(config.init_from, arch)
    if arch is None:
        raise BadArgument("--arch", "is required", "e.g. --arch zfnet_mnist; see 'convscope models'")
    get_spec(arch)
    if config.init_from == PRETRAINED and get_spec(arch).pretrained is None:
        from convscope.errors import WeightsUnavailable

        raise WeightsUnavailable(arch, "has no published pretrained weights", "use --from CKPT with a trained checkpoint")
    if config.variant:
        from convscope.training.ablation import parse_variant

        parse_variant(config.variant)
    return replace(
        config,
        arch=arch,
        lr=config.lr if config.lr is not None else DEFAULT_LR[config.optimizer],
        weight_decay=config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY[config.optimizer],
        augment=parse_augment(config.augment),
        snapshot_epochs=tuple(sorted(set(config.snapshot_epochs))),
        data=str(config.data),
        out_dir=str(config.out_dir),
    )


def _checkpoint_arch(path: str, arch: str | None) -> str | None:
    from convscope.models.weights import is_checkpoint, read_weights_file

    saved = read_weights_file(path)
    if not is_checkpoint(saved):
        return arch  # a plain state dict: --arch says what it is
    if arch is not None and arch != saved["arch"]:
        raise WeightsMismatch(path, f"is a checkpoint of {saved['arch']!r}, not of {arch!r}")
    return str(saved["arch"])


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The resolved configuration stored in a run's ``last.pt`` (for resuming without repeating options).

    Raises:
        BadArgument: the folder has no ``last.pt``.
        BadWeightsFile: ``last.pt`` is invalid, damaged, or not written as ``last.pt``.
    """
    path = Path(run_dir) / "last.pt"
    if not path.exists():
        raise BadArgument(str(path), "no checkpoint to resume from", "start the run without --resume")
    return _saved_config(read_checkpoint(path, role="last"), path)


def _saved_config(saved: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_json(saved["config"])
    except (TypeError, ValueError) as exc:
        raise BadWeightsFile(str(path), f"invalid checkpoint: {exc}") from exc


# -- learning rate ------------------------------------------------------------------------------


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate at a global step (0-based) of ``total``."""
    peak = float(config.lr)  # type: ignore[arg-type]
    if config.schedule == "constant" or total <= 1:
        return peak
    floor = peak * 1e-4
    if config.schedule == "cosine":
        t = step / (total - 1)
        return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2
    warm = int(total * config.warmup)
    start = peak / 25.0
    if step < warm:
        t = step / warm
        return start + (peak - start) * (1 - math.cos(math.pi * t)) / 2
    t = (step - warm) / max(1, total - 1 - warm)
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2


# -- model --------------------------------------------------------------------------------------


@dataclass
class _Model:
    loaded: LoadedModel
    frozen: Frozen
    variant: str | None  # the surgery the module carries: the --from checkpoint's, then --variant


def _build_model(
    config: TrainConfig, categories: tuple[str, ...], preprocess: Preprocess, device: torch.device
) -> _Model:
    """The network to train, on ``device``, seeded by ``config.seed`` (global RNG already seeded)."""
    from convscope.models.load import from_spec, load_model
    from convscope.models.registry import get_spec
    from convscope.models.variants import apply_variant

    spec = get_spec(config.arch)  # type: ignore[arg-type]
    inherited = None
    if config.init_from:
        source = load_model(config.arch, config.init_from, seed=config.seed, device="cpu")
        module = source.module
        replace_head(module, len(categories))
        inherited = _checkpoint_variant(config.init_from)
    else:
        module = spec.build(len(categories))
    if config.variant:
        apply_variant(module, config.variant, stages=dict(spec.stages), input_size=preprocess.input_size)
    frozen = freeze_prefix(module, config.freeze)
    module.to(device)
    if config.channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    variant = ";".join(v for v in (inherited, config.variant) if v) or None
    return _Model(from_spec(spec, module, preprocess, categories, "training"), frozen, variant)


def _checkpoint_variant(path: str) -> str | None:
    """The variant a ``--from`` checkpoint was trained as (its module already carries it)."""
    if path == PRETRAINED:
        return None
    from convscope.models.weights import is_checkpoint, read_weights_file

    saved = read_weights_file(path)
    return saved.get("variant") if is_checkpoint(saved) else None


def _preprocess_for(config: TrainConfig) -> Preprocess:
    from convscope.models.registry import get_spec

    if config.init_from and config.init_from != PRETRAINED:
        from convscope.models.weights import is_checkpoint, read_weights_file

        saved = read_weights_file(config.init_from)
        if is_checkpoint(saved):
            return checkpoint_preprocess(saved)
    return get_spec(config.arch).preprocess  # type: ignore[arg-type]


def _optimizer(config: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters (1-D tensors): the usual practice.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    if not decay and not no_decay:
        raise BadArgument(f"--freeze {config.freeze}", "leaves no parameter to train")
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr = float(config.lr)  # type: ignore[arg-type]
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer]
    options: dict[str, Any] = {"momentum": 0.9, "nesterov": True} if config.optimizer == "sgd" else {}
    try:
        # The fused kernels update all parameters in one pass (~2x faster steps on CPU).
        return kind(groups, lr=lr, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return kind(groups, lr=lr, **options)


# -- the loop -----------------------------------------------------------------------------------


@contextmanager
def _run_environment(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Seed every RNG for the run and restore the caller's RNGs and determinism flag afterwards."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    import torch.utils.deterministic as deterministic_settings

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = deterministic_settings.fill_uninitialized_memory  # type: ignore[attr-defined]
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            np.random.seed(config.seed % 2**32)
            random.seed(config.seed)
            # warn_only: an op without a deterministic kernel warns instead of failing the run.
            torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
            # Deterministic mode also NaN-fills every new tensor (a debugging aid that costs ~5 % of
            # a CPU training step); no op here reads memory it did not write.
            deterministic_settings.fill_uninitialized_memory = False  # type: ignore[attr-defined]
            yield
    finally:
        deterministic_settings.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def train(config: TrainConfig, progress: TrainProgressCallback | None = None) -> TrainResult:
    """Train (or fine-tune, or resume) a model; see the module docstring for the run folder.

    Returns:
        ``TrainResult`` with the history and the best epoch.

    Raises:
        BadArgument: invalid options, an existing run without ``resume``, nothing to resume,
            or resume options that differ from the run's.
        BadWeightsFile: ``last.pt`` is invalid or was not written as ``last.pt`` (a renamed
            ``best.pt``); ``DamagedWeightsFile`` when it changed after it was written.
        DataError: unusable data.
        WeightsMismatch: resuming a run of another architecture.
        CheckpointWriteError: a checkpoint could not be written (the previous one is intact).
        TrainingDiverged: a non-finite loss or weights; the last good checkpoint is kept.
        UnknownModel: unknown architecture.
    """
    from convscope.models.load import resolve_device

    run_dir = Path(config.out_dir)
    last_path = run_dir / "last.pt"
    saved: dict[str, Any] | None = None
    if config.resume:
        if not last_path.exists():
            raise BadArgument(str(last_path), "no checkpoint to resume from", "start the run without --resume")
        saved = read_checkpoint(last_path, role="last")
        if config.arch is not None and config.arch != saved["arch"]:
            raise WeightsMismatch(
                str(last_path), f"is a checkpoint of {saved['arch']!r}, not of {config.arch!r}",
                "resume with the run's own --arch, or train into another --output",
            )
    elif last_path.exists():
        raise BadArgument(
            str(run_dir), "already holds a training run (last.pt)", "add --resume to continue it, or choose another --output"
        )
    config = resolve_config(config)
    if saved is not None:
        _check_resume_config(config, _saved_config(saved, last_path), last_path)
        _check_resume_epochs(config, saved, last_path)
    device = resolve_device(config.device)
    with init_from_env(device) as world:
        if world.backend == "nccl":
            device = world.device  # this rank's GPU, not cuda:0 for all
        if config.batch_size < 2 * world.size:
            raise BadArgument(
                f"--batch-size {config.batch_size}",
                f"is the global batch; {world.size} processes need at least {2 * world.size} (2 per process for BatchNorm)",
            )
        # Every rank has read last.pt and checked the options before rank 0 writes anything.
        world.barrier()
        with _run_environment(config, device):
            return _train(config, saved, device, progress, world)


def _check_resume_config(config: TrainConfig, saved: TrainConfig, path: Path) -> None:
    differences = [
        f"{f.name} {getattr(config, f.name)!r} vs {getattr(saved, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in _RESUME_FREE and getattr(config, f.name) != getattr(saved, f.name)
    ]
    if differences:
        raise BadArgument(
            str(path), "the run was started with other options: " + "; ".join(differences[:4]) + " (given vs saved)",
            "resume with the same options (or none: they are read from the run), or start a new run with --from",
        )


def _check_resume_epochs(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """A resumed run may be extended (or an unfinished one shortened) but never below what is done.

    The schedule is a function of the step and ``config.epochs``, so a new ``epochs`` re-plans it:
    the remaining epochs get the learning rate a run started with that ``epochs`` has at those steps.
    """
    done = int(saved["epoch"])
    if config.epochs < done:
        raise BadArgument(
            f"--epochs {config.epochs}", f"{path.parent} has already trained {done} epochs",
            f"give --epochs {done} or more to extend it",
        )


def _train(
    config: TrainConfig, saved: dict[str, Any] | None, device: torch.device, progress: TrainProgressCallback | None,
    world: World,
) -> TrainResult:
    from convscope.imageio import atomic_write

    run_dir = Path(config.out_dir)
    notify = progress or (lambda event: None)
    preprocess = _preprocess_for(config)

    def loading(done: int, total: int) -> None:
        notify(TrainProgress("load", 0, config.epochs, done, total))

    data = load_training_data(
        config.data, preprocess=preprocess, val_split=config.val_split, limit=config.limit, progress=loading
    )
    if len(data.train) < 2:
        raise DataError(config.data, f"has {len(data.train)} training image; training needs at least 2")
    model = _build_model(config, data.categories, preprocess, device)
    module = model.loaded.module
    optimizer = _optimizer(config, module)
    data_generator = torch.Generator().manual_seed(config.seed)
    transform = BatchTransform(preprocess, config.augment)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    start_epoch = 0
    resumed_from = None
    if saved is not None:
        _restore(run_dir, config, saved, module, optimizer, data_generator)
        history = list(saved["history"])
        best = dict(saved["best"])
        start_epoch = resumed_from = int(saved["epoch"])
        if world.is_rank0:
            _repair_after_kill(run_dir, saved)
            if saved["config"].get("epochs") != config.epochs:
                atomic_write(run_dir / "config.json", json.dumps(config.to_json(), indent=2) + "\n")
    elif world.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", json.dumps(config.to_json(), indent=2) + "\n")
        atomic_write(run_dir / "data.json", json.dumps(data.describe(), indent=2) + "\n")

    selection = "val" if data.val is not None else "last"
    evolution = _evolution(config, model.loaded, data, transform) if world.is_rank0 else None
    if evolution is not None and 0 in config.snapshot_epochs and start_epoch == 0:
        notify(TrainProgress("snapshot", 0, config.epochs, 0, 1))
        _snapshot(run_dir, evolution, 0)

    started = time.perf_counter()
    # The DDP wrapper is built after the restore, so every rank starts from the same weights (it
    # also broadcasts rank 0's); BatchNorm and Dropout act on the global batch, as in one process.
    with world.global_batch(module):
        trainer = world.data_parallel(module)
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_started = time.perf_counter()
            metrics = _train_epoch(
                config, model, trainer, optimizer, data, transform, data_generator, epoch, device, progress, world
            )
            train_seconds = time.perf_counter() - epoch_started
            if data.val is not None:
                notify(TrainProgress("eval", epoch, config.epochs, 0, len(data.val)))
                metrics["val_loss"], metrics["val_accuracy"] = _evaluate_shared(
                    world, module, data.val, transform, data.categories, batch_size=max(256, config.batch_size),
                    precision=config.precision,
                )
            _check_finite(run_dir, module, metrics, epoch, config)
            metrics["images_per_second"] = metrics.pop("_seen") / train_seconds if train_seconds > 0 else None
            metrics["epoch_seconds"] = time.perf_counter() - epoch_started
            if evolution is not None and epoch in config.snapshot_epochs:  # rank 0 only
                notify(TrainProgress("snapshot", epoch, config.epochs, 0, 1))
                _snapshot(run_dir, evolution, epoch)
            history.append(metrics)
            # Validation accuracy alone picks best.pt; without a validation split, the latest epoch.
            improved = selection == "last" or "val_accuracy" not in best or metrics["val_accuracy"] > best["val_accuracy"]
            if improved:
                best = dict(metrics)
            if world.is_rank0:
                _save(run_dir, config, model, optimizer, data_generator, epoch, metrics, history, best, improved)
            notify(TrainProgress("epoch", epoch, config.epochs, epoch, config.epochs, metrics=metrics))

    test = None
    if data.test is not None and world.is_rank0:
        notify(TrainProgress("eval", config.epochs, config.epochs, 0, len(data.test)))
        test = _test_best(run_dir, config, data, transform, device)
    # Rank 0 read best.pt back; the others return its numbers too.
    test = world.all_gather_object(test)[0]
    pictures = None
    if config.snapshot_epochs:
        from convscope.training.snapshots import write_evolution

        pictures = write_evolution(run_dir) if world.is_rank0 else None
    result = TrainResult(
        run_dir=run_dir,
        config=config,
        history=tuple(history),
        best_epoch=int(best["epoch"]),
        best=best,
        selection=selection,
        parameters=sum(p.numel() for p in module.parameters()),
        trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
        skipped=data.skipped,
        resumed_from=resumed_from,
        evolution=pictures[0] if pictures else None,
        data=data.describe(),
        test=test,
        world_size=world.size,
        notes=tuple(n for n in (grayscale_note(config.data, preprocess, config.arch or ""),) if n),
    )
    if world.is_rank0:
        _write_result(result, model.variant, time.perf_counter() - started)
    return result


def _restore(
    run_dir: Path, config: TrainConfig, saved: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
) -> None:
    """Put a verified ``last.pt`` back: weights, optimizer state, every RNG."""
    from convscope.models.weights import load_state_dict_strict

    path = run_dir / "last.pt"
    load_state_dict_strict(module, saved["state_dict"], source=str(path), model_name=config.arch or "")
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BadWeightsFile(
            str(path), f"invalid checkpoint: its optimizer state does not fit this model ({exc})"
        ) from exc
    restore_rng_state(saved["rng"], data_generator)


def _train_epoch(
    config: TrainConfig,
    model: _Model,
    trainer: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    transform: BatchTransform,
    data_generator: torch.Generator,
    epoch: int,
    device: torch.device,
    progress: TrainProgressCallback | None,
    world: World,
) -> dict[str, Any]:
    """One pass over the training split; returns the epoch's train metrics (and ``_seen`` images).

    ``trainer`` is the module to step (the DDP wrapper under torchrun). Every rank walks the same
    global batches and trains on its share; the metrics are over the global batches.

    Raises:
        TrainingDiverged: a step's loss is not finite (raised on every rank, before that step
            updates anything).
    """
    module = model.loaded.module
    trainer.train()
    model.frozen.hold_eval(module)
    batches = epoch_batches(len(data.train), config.batch_size, data_generator)
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
            x = transform(data.train.images[batch], data_generator)[share.start : share.stop]
        else:
            x = transform(data.train.images[index], data_generator)
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
            raise _diverged(
                Path(config.out_dir), config, epoch, f"the loss became {float(step_loss)} at step {step + 1} of {steps}"
            )
        optimizer.zero_grad(set_to_none=True)
        weighted.backward()
        optimizer.step()
        totals += step_totals
        seen += len(batch)
        if progress is not None:
            progress(
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


def _evaluate_shared(
    world: World, module: nn.Module, split: Split, transform: BatchTransform, categories: tuple[str, ...], *,
    batch_size: int, precision: str,
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``module`` on ``split``, each rank scoring its contiguous share."""
    if not world.distributed:
        scores = evaluate_split(module, split, transform, categories, batch_size=batch_size, precision=precision)
        return scores.loss, scores.accuracy
    share = shard_range(len(split), world.rank, world.size)
    local = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    if len(share):
        part = split.subset(torch.arange(share.start, share.stop))
        scores = evaluate_split(module, part, transform, categories, batch_size=batch_size, precision=precision)
        local = torch.tensor(
            [scores.loss * scores.count, float(scores.confusion.diag().sum()), scores.count], dtype=torch.float64
        )
    total = world.all_reduce_sum(local)
    return float(total[0] / total[2]), float(total[1] / total[2])


def _check_finite(run_dir: Path, module: nn.Module, metrics: dict[str, Any], epoch: int, config: TrainConfig) -> None:
    """Refuse to save an epoch whose weights or scores are not finite (the last step can still overflow)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _diverged(run_dir, config, epoch, f"{name} holds non-finite values after the last step")
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _diverged(run_dir, config, epoch, f"the {key.replace('_', ' ')} is {value}")


def _diverged(run_dir: Path, config: TrainConfig, epoch: int, what: str) -> TrainingDiverged:
    kept = (
        f"last.pt keeps epoch {epoch - 1}, the last good one" if epoch > 1 else "no checkpoint was written"
    )
    hint = f"try an --lr below {config.lr:g}"
    if config.precision == "bf16":
        hint += ", or --precision fp32"
    return TrainingDiverged(str(run_dir), f"training diverged in epoch {epoch}: {what}; stopped, {kept}", hint)


def _test_best(
    run_dir: Path, config: TrainConfig, data: TrainingData, transform: BatchTransform, device: torch.device
) -> dict[str, Any]:
    """Score ``best.pt`` on the test split, loaded as a user would load it (float32, no augmentation)."""
    from convscope.models.load import load_model

    assert data.test is not None
    chosen = load_model(weights=run_dir / "best.pt", device=str(device))
    epoch = int(read_checkpoint(run_dir / "best.pt")["epoch"])
    scores = evaluate_split(
        chosen.module, data.test, transform, data.categories, batch_size=max(256, config.batch_size)
    )
    return {"accuracy": scores.accuracy, "loss": scores.loss, "count": scores.count, "epoch": epoch,
            "checkpoint": "best.pt"}


def _write_result(result: TrainResult, variant: str | None, elapsed: float) -> None:
    from convscope.imageio import atomic_write

    batch = min(result.config.batch_size, int(result.data["splits"]["train"]))
    payload = {
        "arch": result.config.arch,
        "variant": variant,
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
    atomic_write(result.run_dir / "result.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _repair_after_kill(run_dir: Path, saved: dict[str, Any]) -> None:
    """A kill between writing last.pt and best.pt/metrics.jsonl leaves those one epoch behind."""
    from convscope.errors import ConvscopeError
    from convscope.imageio import atomic_write

    # SIGKILL can leave the hidden temporary file of an atomic write behind (never a final name).
    for folder in (run_dir, run_dir / "snapshots"):
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
    epoch = int(saved["epoch"])
    best_path = run_dir / "best.pt"
    if saved["best"].get("epoch") == epoch:
        try:
            stale = read_checkpoint(best_path)["epoch"] != epoch
        except ConvscopeError:
            stale = True
        if stale:
            write_checkpoint(best_path, seal({**saved, "optimizer": None, "rng": None, "role": "best"}))
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in saved["history"]))


def resume(
    run_dir: str | os.PathLike[str], progress: TrainProgressCallback | None = None, *, device: str | None = None,
    epochs: int | None = None,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its ``last.pt`` with the options it was started with.

    Args:
        epochs: extend the run (finished or not) to this many epochs; the learning-rate schedule is
            re-planned over them (see ``_check_resume_epochs``). Default: the run's own.

    Raises:
        BadArgument: ``epochs`` below the epochs already trained (and as ``train``).
    """
    config = replace(load_run_config(run_dir), out_dir=str(run_dir), resume=True)
    if device is not None:
        config = replace(config, device=device)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    return train(config, progress)


def _evolution(config: TrainConfig, loaded: LoadedModel, data: TrainingData, transform: BatchTransform) -> Any:
    if not config.snapshot_epochs:
        return None
    from convscope.training.snapshots import FeatureEvolution

    source = data.selection or data.train
    generator = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(len(source), generator=generator)[:PROBE_COUNT].sort().values
    probes = transform(source.images[pick]).to(loaded.device)
    return FeatureEvolution(loaded, probes, channels_per_layer=config.snapshot_channels, seed=config.seed)


def _snapshot(run_dir: Path, evolution: Any, epoch: int) -> None:
    from convscope.training.snapshots import save_snapshot

    save_snapshot(run_dir, evolution.record(epoch))


def _save(
    run_dir: Path,
    config: TrainConfig,
    model: _Model,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    epoch: int,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    improved: bool,
) -> None:
    from convscope.imageio import atomic_write

    loaded = model.loaded
    common: dict[str, Any] = {
        "arch": loaded.name,
        "state_dict": loaded.module.state_dict(),
        "categories": loaded.categories,
        "preprocess": loaded.preprocess,
        "epoch": epoch,
        "config": config.to_json(),
        "metrics": metrics,
        "history": history,
        "best": best,
        "variant": model.variant,
    }
    # last.pt first: it is what --resume reads; best.pt and metrics.jsonl are derived from it.
    write_checkpoint(
        run_dir / "last.pt",
        make_checkpoint(**common, optimizer=optimizer.state_dict(), rng=rng_state(data_generator), role="last"),
    )
    if improved:
        write_checkpoint(run_dir / "best.pt", checkpoint_bytes(make_checkpoint(**common, role="best")))
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(m, allow_nan=False) + "\n" for m in history))
