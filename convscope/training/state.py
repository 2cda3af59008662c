"""One training run in memory: ``RunState``, how it is built, and what a run reports and returns.

``build_run`` turns a resolved ``TrainConfig`` into everything the epochs work with: the data, the
network (fresh, or an ``init_from`` checkpoint with a new head, with its variant and frozen layers),
the optimizer and the seeded data generator. The loop (``convscope.training.loop``) and the run
folder (``convscope.training.rundir``) take that one object instead of a dozen arguments; the
loop adds to its ``history`` and ``best`` after every epoch.

``seeded`` is the run's environment: every RNG seeded from ``config.seed`` on entry, the caller's
RNGs and determinism flags given back on exit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convscope.distributed import World
from convscope.errors import BadArgument, DataError
from convscope.models.checkpoints import checkpoint_preprocess
from convscope.preprocess import Preprocess
from convscope.training.batches import BatchTransform
from convscope.training.config import PRETRAINED, TrainConfig
from convscope.training.data import TrainingData, load_training_data
from convscope.training.runrecord import RunRecord
from convscope.training.snapshots import FeatureEvolution
from convscope.training.transfer import Frozen, freeze_prefix, replace_head
from convscope.training.wording import literal, option_error
from convscope.types import LoadedModel

PROBE_COUNT = 32  # images the feature-evolution snapshots follow


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
        head: module path of the classifier head replaced for the data's classes (found from
            the graph), or ``None`` when the network was built for them.
        frozen: what ``freeze`` fixed (``transfer.Frozen.record`` plus a ``description``), or
            ``None`` when nothing is frozen.
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
    head: str | None = None
    frozen: dict[str, Any] | None = None

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


@dataclass
class RunState:
    """One training run as the epochs carry it (built by ``build_run``).

    Attributes:
        config: the resolved configuration.
        world: this process's place in the run (rank 0 of 1 without torchrun).
        device: where the network trains.
        data: the splits (``val`` chooses ``best.pt``; ``test`` is scored once, at the end).
        transform: images of a split -> network input, with ``config.augment`` when given a
            generator.
        loaded: the network being trained; its module is trained in place.
        frozen: what ``config.freeze`` fixed (held in eval mode while the rest trains).
        variant: the surgery the module carries: the ``init_from`` checkpoint's, then
            ``config.variant`` (``;``-joined), or ``None``.
        optimizer: steps the trainable parameters.
        data_generator: epoch order and augmentation; its state goes into ``last.pt``.
        progress: the caller's progress callback, if any.
        head: the classifier head replaced for the data's classes, or ``None``.
        record: the run folder's record; rank 0 writes every file through it (``None`` on the
            other ranks, and until ``rundir.open_record``).
        history: metrics of every finished epoch, as in ``metrics.jsonl``.
        best: the metrics of the epoch saved as ``best.pt`` (empty before the first).
        resumed_from: the epoch a resumed run continued from, else ``None``.
        evolution: records the feature-evolution snapshots (rank 0, with ``snapshot_epochs``).
    """

    config: TrainConfig
    world: World
    device: torch.device
    data: TrainingData
    transform: BatchTransform
    loaded: LoadedModel
    frozen: Frozen
    variant: str | None
    optimizer: torch.optim.Optimizer
    data_generator: torch.Generator
    progress: TrainProgressCallback | None = None
    head: str | None = None
    record: RunRecord | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    evolution: FeatureEvolution | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def module(self) -> nn.Module:
        return self.loaded.module

    @property
    def start_epoch(self) -> int:
        """The last epoch already done (0 for a new run)."""
        return self.resumed_from or 0

    @property
    def selection(self) -> str:
        """How ``best.pt`` is chosen: ``val`` (best validation accuracy) or ``last`` (no validation split)."""
        return "val" if self.data.val is not None else "last"

    def notify(self, event: TrainProgress) -> None:
        if self.progress is not None:
            self.progress(event)


def build_run(
    config: TrainConfig, device: torch.device, world: World, progress: TrainProgressCallback | None = None
) -> RunState:
    """Load the data and build the network, optimizer and data generator of a run (RNGs seeded).

    A ``torchvision:``/``timm:`` architecture is loaded first (``load_model`` with the run's
    weights: ``pretrained``, a file, or seeded random): its preprocessing decides how the data is
    decoded, and an unavailable download fails before any image is read.

    Raises:
        DataError: unusable data, or fewer than two training images.
        BadArgument: ``config.freeze`` leaves nothing to train; no classifier head to replace.
        WeightsUnavailable: pretrained weights that are neither cached nor downloadable.
    """
    source = _external_source(config)
    preprocess = source.preprocess if source is not None else _preprocess_for(config)

    def loading(done: int, total: int) -> None:
        if progress is not None:
            progress(TrainProgress("load", 0, config.epochs, done, total))

    data = load_training_data(
        config.data, preprocess=preprocess, val_split=config.val_split, limit=config.limit, progress=loading
    )
    if len(data.train) < 2:
        raise DataError(config.data, f"has {len(data.train)} training image; training needs at least 2")
    head: str | None
    if source is not None:
        loaded, frozen, variant, head = _build_external(config, source, data.categories, device)
    else:
        loaded, frozen, variant, head = _build_model(config, data.categories, preprocess, device)
    optimizer = _optimizer(config, loaded.module)
    data_generator = torch.Generator().manual_seed(config.seed)
    transform = BatchTransform(preprocess, config.augment)
    return RunState(config, world, device, data, transform, loaded, frozen, variant, optimizer, data_generator,
                    progress, head)


def feature_evolution(state: RunState) -> FeatureEvolution | None:
    """The snapshot recorder of a run with ``snapshot_epochs``: fixed probes and channels from the seed."""
    config = state.config
    if not config.snapshot_epochs:
        return None
    source = state.data.selection or state.data.train
    generator = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(len(source), generator=generator)[:PROBE_COUNT].sort().values
    probes = state.transform(source.images[pick]).to(state.loaded.device)
    return FeatureEvolution(state.loaded, probes, channels_per_layer=config.snapshot_channels, seed=config.seed)


def _build_model(
    config: TrainConfig, categories: tuple[str, ...], preprocess: Preprocess, device: torch.device
) -> tuple[LoadedModel, Frozen, str | None, str | None]:
    """The network to train, on ``device``, seeded by ``config.seed`` (global RNG already seeded).

    Returns:
        the model, what ``config.freeze`` fixed, the variant its module carries, and the head
        replaced for ``categories`` (``None`` when the network was built for them).
    """
    from convscope.models.load import from_spec, load_model
    from convscope.models.registry import get_spec
    from convscope.models.variants import apply_variant

    spec = get_spec(config.arch)  # type: ignore[arg-type]
    inherited = None
    head = None
    if config.init_from:
        source = load_model(config.arch, config.init_from, seed=config.seed, device="cpu")
        module = source.module
        head = replace_head(module, len(categories), preprocess.input_size, spec.name)
        inherited = _checkpoint_variant(config.init_from)
    else:
        module = spec.build(len(categories))
    if config.variant:
        apply_variant(module, config.variant, stages=dict(spec.stages), input_size=preprocess.input_size)
    frozen = freeze_prefix(module, config.freeze, preprocess.input_size, spec.name)
    module.to(device)
    if config.channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    variant = ";".join(v for v in (inherited, config.variant) if v) or None
    return from_spec(spec, module, preprocess, categories, "training"), frozen, variant, head


def _external_source(config: TrainConfig) -> LoadedModel | None:
    """The ``torchvision:``/``timm:`` model a run starts from (on the CPU), or ``None`` for a built-in.

    ``init_from``: ``"pretrained"``, a weights file or a convscope checkpoint of this
    architecture; ``None`` is a seeded random initialisation.
    """
    from convscope.models.external import parse_model_spec
    from convscope.models.load import load_model

    if parse_model_spec(str(config.arch)).kind == "builtin":
        return None
    source = load_model(config.arch, config.init_from or "random", seed=config.seed, device="cpu")
    if getattr(source.module, "aux_logits", False):  # GoogLeNet, Inception v3: a tuple of logits while training
        raise option_error(BadArgument, f"{{arch}} {literal(source.name)}",
                           "has auxiliary classifiers (aux_logits), which training here does not support",
                           "train another architecture")
    return source


def _build_external(
    config: TrainConfig, source: LoadedModel, categories: tuple[str, ...], device: torch.device
) -> tuple[LoadedModel, Frozen, str | None, str]:
    """A ``torchvision:``/``timm:`` network with its head replaced for ``categories`` (found from the
    graph, see ``transfer``), its backbone frozen as ``config.freeze`` says, on ``device``."""
    from dataclasses import replace

    module = source.module
    size = source.preprocess.input_size
    head = replace_head(module, len(categories), size, source.name)
    frozen = freeze_prefix(module, config.freeze, size, source.name)
    module.to(device)
    if config.channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return replace(source, categories=tuple(categories), weights="training"), frozen, None, head


def _checkpoint_variant(path: str) -> str | None:
    """The variant an ``init_from`` checkpoint was trained as (its module already carries it)."""
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
        raise option_error(BadArgument, f"{{freeze}} {literal(config.freeze)}", "leaves no parameter to train")
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



@contextmanager
def seeded(config: TrainConfig, device: torch.device) -> Iterator[None]:
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

