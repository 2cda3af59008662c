"""What a training run depends on: ``TrainConfig``, its resolution, and the checks of a resume.

``resolve_config`` turns what a caller gave into what a run uses (defaults per optimizer, the
architecture of an ``init_from`` checkpoint, canonical augmentations) and refuses values that cannot
work; the resolved config is saved as ``config.json`` and inside every checkpoint. A resumed run
must agree with the config its ``last.pt`` holds, except for the options in ``RESUME_FREE``: they do
not change what is computed, and a new ``epochs`` re-plans the learning-rate schedule
(``convscope.training.schedule``).

Errors name options as parameters (``epochs 0: must be at least 1``); the CLI re-words them as its
flags (``convscope.training.wording``).
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from convscope.errors import BadArgument, BadWeightsFile, DataError, WeightsMismatch, WeightsUnavailable
from convscope.training.batches import parse_augment
from convscope.training.checkpoint import read_checkpoint
from convscope.training.transfer import FREEZE_MODES
from convscope.training.wording import literal, option_error

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
DEFAULT_LR = {"adamw": 3e-3, "adam": 1e-3, "sgd": 0.05}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "adam": 0.0, "sgd": 5e-4}
PRETRAINED = "pretrained"
RANDOM = "random"  # ``init_from="random"``: a seeded initialisation, as no ``init_from``
# The model-spec kinds a run can train: built-in names and the published architectures.
TRAINABLE_KINDS = ("builtin", "torchvision", "timm")
# Options that may differ when resuming (they do not change the computation's result; a new
# ``epochs`` re-plans the learning-rate schedule, see ``check_resume_options``).
RESUME_FREE = ("resume", "out_dir", "device", "epochs")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved as ``config.json`` once resolved).

    Attributes:
        data: ``"fashion-mnist"``, ``"digits"`` or a folder (see ``load_training_data``).
        out_dir: the run folder.
        arch: a registry name, ``torchvision:NAME`` or ``timm:NAME`` (the spec is what checkpoints
            record, so ``load_model(weights=best.pt)`` rebuilds it); ``None`` with ``init_from``
            a checkpoint takes the checkpoint's.
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
        init_from: ``"pretrained"`` or a weights/checkpoint file to start from; its classifier
            head (found from the graph, see ``convscope.training.transfer``) is replaced by a fresh
            one for this dataset's classes (transfer). ``None`` or ``"random"``: a seeded random
            initialisation (resolved to ``None``).
        freeze: ``none``, ``features`` or ``all-but-last`` (see ``convscope.training.transfer``;
            what it froze is in ``result.json``).
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


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Validate and fill defaults (lr, weight decay, arch from a checkpoint, canonical augment).

    Raises:
        BadArgument: a value that cannot work.
        UnknownModel: unknown architecture.
        WeightsUnavailable: ``init_from="pretrained"`` for an architecture without published weights.
    """
    from convscope.models.variants import parse_variant

    if config.epochs < 1:
        raise _bad("epochs", config.epochs, "must be at least 1")
    if config.batch_size < 2:
        raise _bad("batch_size", config.batch_size, "must be at least 2 (BatchNorm needs two images)")
    if config.optimizer not in OPTIMIZERS:
        raise _bad("optimizer", config.optimizer, "unknown optimizer", "choose from: " + ", ".join(OPTIMIZERS))
    if config.schedule not in SCHEDULES:
        raise _bad("schedule", config.schedule, "unknown schedule", "choose from: " + ", ".join(SCHEDULES))
    if config.precision not in PRECISIONS:
        raise _bad("precision", config.precision, "unknown precision", "choose from: fp32, bf16")
    if config.freeze not in FREEZE_MODES:
        raise _bad("freeze", config.freeze, "unknown freeze mode", "choose from: " + ", ".join(FREEZE_MODES))
    if config.lr is not None and not (config.lr > 0 and math.isfinite(config.lr)):
        raise _bad("lr", config.lr, "must be a positive number")
    if config.weight_decay is not None and not config.weight_decay >= 0:
        raise _bad("weight_decay", config.weight_decay, "must be 0 or more")
    if not 0.0 <= config.warmup < 1.0:
        raise _bad("warmup", config.warmup, "must be at least 0 and below 1")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise _bad("label_smoothing", config.label_smoothing, "must be at least 0 and below 1")
    if config.snapshot_channels < 1:
        raise _bad("snapshot_channels", config.snapshot_channels, "must be at least 1")
    for epoch in config.snapshot_epochs:
        if not 0 <= epoch <= config.epochs:
            raise _bad("snapshot_epochs", epoch, f"must be between 0 (before training) and {{epochs}} {config.epochs}")
    arch = config.arch
    init_from = None if config.init_from == RANDOM else config.init_from
    if config.freeze != "none" and not init_from:
        raise _bad("freeze", config.freeze, "freezing needs learned features to keep",
                   "add {init_from} CKPT or {init_from} pretrained")
    if init_from and init_from != PRETRAINED:
        arch = _checkpoint_arch(init_from, arch)
    if arch is None:
        raise option_error(BadArgument, "{arch}", "is required", "e.g. {arch} zfnet_mnist; see 'convscope models'")
    arch = _check_arch(arch, init_from, config.variant)
    if config.variant:
        parse_variant(config.variant)
    return replace(
        config,
        arch=arch,
        init_from=init_from,
        lr=config.lr if config.lr is not None else DEFAULT_LR[config.optimizer],
        weight_decay=config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY[config.optimizer],
        augment=parse_augment(config.augment),
        snapshot_epochs=tuple(sorted(set(config.snapshot_epochs))),
        data=str(config.data),
        out_dir=str(config.out_dir),
    )


def _check_arch(arch: str, init_from: str | None, variant: str | None) -> str:
    """``arch`` as a run records it (the spec as ``load_model`` names it), checked without building it.

    Raises:
        UnknownModel: an unknown built-in, torchvision or timm name (timm not installed).
        BadArgument: a factory or ``.pt2`` spec, or a variant of a ``torchvision:``/``timm:`` model.
        WeightsUnavailable: pretrained weights that do not exist, or (``CONVSCOPE_OFFLINE=1``)
            are not cached: the line ``load_model`` gives, naming the URL and ``--weights FILE``.
    """
    from convscope.models.external import parse_model_spec
    from convscope.models.load import check_model
    from convscope.models.registry import get_spec

    request = parse_model_spec(arch)
    if request.kind not in TRAINABLE_KINDS:
        raise option_error(BadArgument, f"{{arch}} {literal(request.text)}",
                           "training takes a built-in architecture, torchvision:NAME or timm:NAME",
                           "see 'convscope models'; a factory or .pt2 model can be looked at, not trained here")
    if request.kind == "builtin":
        get_spec(arch)
        if init_from == PRETRAINED and get_spec(arch).pretrained is None:
            raise option_error(WeightsUnavailable, literal(arch), "has no published pretrained weights",
                               "use {init_from} CKPT with a trained checkpoint")
        return arch
    if variant:
        raise _bad("variant", variant, f"variants are surgeries on the built-in architectures, not on {request.kind} models",
                   "drop {variant}")
    # Names and (offline) pretrained availability; a file is read and checked when the run builds.
    check_model(request.text, PRETRAINED if init_from == PRETRAINED else RANDOM)
    return request.text


def _bad(option: str, value: object, reason: str, hint: str | None = None) -> BadArgument:
    """``BadArgument`` for ``option`` given ``value``; ``reason`` and ``hint`` are templates."""
    return option_error(BadArgument, f"{{{option}}} {literal(value)}", reason, hint)


def _checkpoint_arch(path: str, arch: str | None) -> str | None:
    from convscope.models.weights import is_checkpoint, read_weights_file

    saved = read_weights_file(path)
    if not is_checkpoint(saved):
        return arch  # a plain state dict: ``arch`` says what it is
    if arch is not None and arch != saved["arch"]:
        raise WeightsMismatch(path, f"is a checkpoint of {saved['arch']!r}, not of {arch!r}")
    return str(saved["arch"])


# -- resuming -----------------------------------------------------------------------------------


def read_last(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified ``last.pt`` of a run folder, which a resumed run continues from.

    Raises:
        BadArgument: the folder has no ``last.pt``.
        BadWeightsFile: ``last.pt`` is invalid, damaged, or not written as ``last.pt``.
    """
    path = Path(run_dir) / "last.pt"
    if not path.exists():
        raise option_error(BadArgument, literal(path), "no checkpoint to resume from", "start the run without {resume}")
    return read_checkpoint(path, role="last")


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The resolved configuration stored in a run's ``last.pt`` (for resuming without repeating options).

    Raises:
        BadArgument: the folder has no ``last.pt``.
        BadWeightsFile: ``last.pt`` is invalid, damaged, or not written as ``last.pt``.
    """
    return saved_config(read_last(run_dir), Path(run_dir) / "last.pt")


def saved_config(saved: dict[str, Any], path: Path) -> TrainConfig:
    """The config a checkpoint read from ``path`` holds.

    Raises:
        BadWeightsFile: it holds no valid config.
    """
    try:
        return TrainConfig.from_json(saved["config"])
    except (TypeError, ValueError) as exc:
        raise BadWeightsFile(str(path), f"invalid checkpoint: {exc}") from exc


def compare_configs(config: TrainConfig, saved: TrainConfig, free: tuple[str, ...] = RESUME_FREE) -> list[str]:
    """``"<field> <given> vs <saved>"`` for every option but ``free`` that differs."""
    return [
        f"{f.name} {getattr(config, f.name)!r} vs {getattr(saved, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in free and getattr(config, f.name) != getattr(saved, f.name)
    ]


def check_resume_arch(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run of another architecture (checked before ``resolve_config``).

    Raises:
        WeightsMismatch: ``config.arch`` is given and is not the checkpoint's.
    """
    if config.arch is not None and config.arch != saved["arch"]:
        raise option_error(
            WeightsMismatch, literal(path), literal(f"is a checkpoint of {saved['arch']!r}, not of {config.arch!r}"),
            "resume with the run's own {arch}, or train into another {out_dir}",
        )


def check_resume_options(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Refuse a resolved ``config`` that differs from the one ``last.pt`` (read from ``path``) holds.

    A resumed run may be extended (or an unfinished one shortened) but never below what is done.
    The schedule is a function of the step and ``config.epochs``, so a new ``epochs`` re-plans it:
    the remaining epochs get the learning rate a run started with that ``epochs`` has at those steps.

    Raises:
        BadArgument: an option other than ``RESUME_FREE`` differs, or ``epochs`` is below the
            epochs already trained.
        BadWeightsFile: ``last.pt`` holds no valid config.
    """
    differences = compare_configs(config, saved_config(saved, path))
    if differences:
        raise option_error(
            BadArgument, literal(path),
            literal("the run was started with other options: " + "; ".join(differences[:4]) + " (given vs saved)"),
            "resume with the same options (or none: they are read from the run), or start a new run with {init_from}",
        )
    done = int(saved["epoch"])
    if config.epochs < done:
        raise option_error(
            BadArgument, f"{{epochs}} {config.epochs}", f"{literal(path.parent)} has already trained {done} epochs",
            f"give {{epochs}} {done} or more to extend it",
        )


def check_resume_data(config: TrainConfig, recorded: object, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume on data other than the run started with.

    Args:
        recorded: the fingerprint ``run.json`` holds (``None`` for a run from before ``run.json``:
            its fingerprint is taken now).
        fingerprint: the data's fingerprint now (``data.data_fingerprint``).

    Raises:
        DataError: the fingerprints differ.
    """
    if not isinstance(recorded, dict) or recorded.get("sha256") == fingerprint["sha256"]:
        return
    raise DataError(
        config.data,
        f"the data changed since the run started ({recorded.get('count')} {recorded.get('unit', 'files')} then, "
        f"{fingerprint['count']} now; their names, sizes or modification times differ)",
        "resume only on the data the run started with, or start a new run",
    )
