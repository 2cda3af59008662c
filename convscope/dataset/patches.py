"""Top-k dataset patches: what does feature map k of layer l detect? (Zeiler & Fergus 2014, Fig. 2)

The answer is the ``top`` strongest activations of that map over a whole dataset, each shown as
the image crop under its receptive field beside its deconvnet projection.

**Mining** (``top_patches``) is one pass over the data with one forward per batch for all layers.
For each image and channel the score is the channel's maximum over its map, at one cell (the
first in row-major order on ties), so an image appears at most once in a channel's list. Each
layer keeps a running ``(channels, top)`` table of values, image positions and cells on the
model's device; a batch's ``(channels, batch)`` candidates are merged into it by sorting on
(value descending, image position ascending). The merge is exact and order-free, so the tables
after any split of the data into batches, shards (torchrun ranks) or resumed runs are the same
as after one pass, provided each image's activations do not depend on its batch neighbours
(true in eval mode; see ``_forward`` for the one numerical exception). Memory is the tables plus
one batch: it does not grow with the dataset.

What makes the pass cost little more than a forward (issue 22): each layer's hook takes the
maps' ``amax`` and keeps only the entries that reach their row's current ``top``-th value, with
the cell of their maximum (``topk.candidates``); after the pass the rows of all layers that
received any are merged in one sort (``topk.merge_candidates``). And the pass stops after the
last mined layer (``probes.hooks.stop_after``): the rest of the network cannot change the tables.
It runs the inference copy with BatchNorm and ReLU folded into the convolutions (``_mining_network``), so the mined
values are the network's activations to float32 rounding (about 1e-6 relative), not bit for bit.

The running tables, the position reached, the image count and the skipped files make up the
state, a small dict of tensors checkpointed atomically every few batches and on Ctrl-C; a
resumed run continues from the last checkpoint and ends with the same tables. The state also
records what it is a state *of*: the settings, a SHA-256 of the model's weights (its state dict,
whatever file or seed they came from) and a fingerprint of the images (each file's path, size and
modification time; the bytes of a tensor). A resume with anything else is refused, so one result
never mixes two models or two datasets.

The folder the CLI keeps the states in is marked as convscope's by a small JSON file
(``claim_state_folder``); only a marked folder is cleaned up, and only of the files the marker
lists (``release_state_folder``), so a user's folder of the same name is never touched.

Under torchrun each rank mines a contiguous shard (``distributed.shard_range``), then the ranks'
tables are gathered and merged with the same function.

**Projections** (``collect_patches``) are a second, short pass over the winners only: each
winner's image is loaded again and its kept activation projected to pixels with the deconvnet
(``methods.deconvnet.project_cells``, one backward for a whole batch of winners). Its cost grows
with channels x top, never with the dataset.

Receptive-field boxes come from ``probes.geometry``: ``[x0, y0, x1, y1]`` in the network input's
pixels, right/bottom exclusive, clipped to the image.

**Ranking by relevance** (``rank="relevance"``; Concept Relevance Propagation, Achtibat et al.
2023, zennit-crp's "relevance maximization") asks a different question: not which images make
the channel fire, but in which images the channel *contributed most to the decision* for a
class. Per image, LRP (``probes.lrp_rules``, a composite of rules) propagates the target logit
back through the network; the relevance arriving at the mined layer, summed over the channel's
map, is the channel's conditional relevance for that image, and the image's score. Its cell is
that of the channel's largest relevance, and its box the receptive field there, exactly as for
an activation. zennit-crp ranks the same sum, by default divided by the layer's total absolute
relevance (``abs_norm``); the raw sum is kept here, so a value reads in logit units and an image
whose other channels carry more relevance is not pushed up. The ranking pass is one forward and
one backward per batch for all channels of all layers: every mined layer's relevance is the
gradient arriving at its output in the same backward. The target is a class (index or label) or
``"predicted"``, each image's own top-1 class.

Its projections are the channels' conditional heatmaps (CRP): the relevance at the mined layer
kept on the one channel (all other channels zeroed) and propagated on to the input with the same
rules, so the map shows where in the image the relevance passing through that channel comes from
and sums to the channel's relevance up to the rules' stabilisers and biases. Only relevance
flowing *through* the layer is followed: a residual path around it (zennit-crp's mask hook would
let it through) is not part of the channel's contribution. One forward and two backward halves
(logits to the layer, the layer to the input) serve a batch of winners, each row an image
repeated with its own channel's mask.

The exactness promise of the merge carries over when each image's relevance does not depend on
its batch neighbours. The backward pass makes that a little weaker than the forward one: a
matrix product may round differently for another batch size, so across other batchings (other
``batch_size``, torchrun shards) values agree to float rounding and only near-ties can swap. A
resumed run continues on the same batch boundaries and is unaffected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convscope.dataset.sources import ImageSource, TensorSource, open_source
from convscope.dataset.state import (
    MinerState,
    load_state,
    save_state,
    state_path,
    weights_digest,
)
from convscope.dataset.topk import (
    EMPTY,
    Candidates,
    TopkTable,
    candidates,
    merge_candidates,
    merge_topk,
    relevance_peaks,
)
from convscope.distributed import World, current_world, shard_range
from convscope.errors import BadArgument, BadTarget, UnknownLayer, close_matches
from convscope.methods._common import ModelLike
from convscope.methods.gradcam import feature_map_of
from convscope.methods.targets import resolve_targets
from convscope.models.load import as_loaded
from convscope.probes.fold import fold_batchnorm
from convscope.probes.geometry import Geometry, cell_boxes_xyxy, layer_geometries
from convscope.probes.hooks import StopForward, capture, eval_mode, reduce_outputs, stop_after
from convscope.probes.layers import map_layer
from convscope.probes.layout import Layout
from convscope.probes.lrp_rules import COMPOSITES, LrpState, box_bounds, lrp_rules
from convscope.types import LoadedModel

Progress = Callable[[int], None]
ChannelsArg = Sequence[int] | Mapping[str, Sequence[int]] | None
RANKS = ("activation", "relevance")
PREDICTED = "predicted"  # the relevance target meaning each image's own top-1 class
DEFAULT_COMPOSITE = COMPOSITES[0]  # epsilon-plus-flat, zennit-crp's usual choice


@dataclass(frozen=True)
class PatchEntry:
    """One of a channel's top activations.

    Attributes:
        image: the image's path, or its position for Fashion-MNIST and tensors.
        index: its position in the source.
        value: the activation (the channel's maximum over the image's map), or for a relevance
            ranking the channel's relevance (its relevance summed over the map).
        cell: ``(y, x)`` of that maximum (of the largest relevance) in the feature map.
        box: ``(x0, y0, x1, y1)`` input pixels the cell sees, right/bottom exclusive, clipped.
    """

    image: str | int
    index: int
    value: float
    cell: tuple[int, int]
    box: tuple[int, int, int, int]

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, "value": self.value, "cell": list(self.cell), "box": list(self.box)}


@dataclass(frozen=True)
class PatchIndex:
    """The top patches of every mined channel of every layer.

    Attributes:
        model: the model's name.
        source: what was mined (folder, list file, ``fashion-mnist:train``...).
        images: how many images were read (skipped ones not counted).
        skipped: ``(image, reason)`` of every unreadable image, in source order.
        layers: layer name as given -> one tuple of entries per listed channel, best first.
        channels: layer -> the channel ids of those lists (all channels unless chosen).
        chosen: whether the channels were chosen (``patches.json`` then names them).
        top: entries asked for per channel (fewer when the dataset is smaller).
        input_size: ``(H, W)`` of the network input the boxes refer to.
        boxes_exact: layer -> whether its receptive field is exact (plain conv/pool chain).
        rank: ``"activation"`` or ``"relevance"``: what the lists are ranked by.
        target: for a relevance ranking, the explained class index or ``"predicted"``.
        label: that class's name, when the model has names.
        composite: for a relevance ranking, the LRP composite.
        uncovered: for a relevance ranking, the module paths no LRP rule covers (relevance
            passes them as a plain gradient).
        statistics: with ``top_patches(statistics=True)``: layer -> per listed channel
            ``{"mean", "max", "firing"}`` over all images read: the mean of the map's spatial
            mean, the largest cell, the fraction of images with a cell above 0.
        counts: layer -> its number of channels (all, not only the listed ones).
    """

    model: str
    source: str
    images: int
    skipped: tuple[tuple[str | int, str], ...]
    layers: dict[str, tuple[tuple[PatchEntry, ...], ...]]
    channels: dict[str, tuple[int, ...]]
    chosen: bool
    top: int
    input_size: tuple[int, int]
    boxes_exact: dict[str, bool]
    rank: str = "activation"
    target: int | str | None = None
    label: str | None = None
    composite: str | None = None
    uncovered: tuple[str, ...] = ()
    statistics: dict[str, tuple[dict[str, float], ...]] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``patches.json`` document (no timings: equal runs give equal bytes)."""
        document: dict[str, Any] = {"model": self.model, "rank": self.rank}
        if self.rank == "relevance":
            document["target"] = self.target
            if self.label is not None:
                document["label"] = self.label
            document["composite"] = self.composite
            document["uncovered"] = list(self.uncovered)
        document |= {
            "images": self.images,
            "skipped": [{"path": str(image), "error": reason} for image, reason in self.skipped],
            "layers": {
                name: [[entry.as_json() for entry in entries] for entries in lists]
                for name, lists in self.layers.items()
            },
        }
        if self.chosen:
            document["channels"] = {name: list(ids) for name, ids in self.channels.items()}
        return document


@dataclass(frozen=True)
class ChannelPatches:
    """The pictures of one channel's top patches.

    Attributes:
        layer: layer name as given.
        channel: channel id.
        entries: the channel's top entries, best first.
        crops: per entry, ``(C, h, w)`` float32 in ``[0, 1]``: the network's view of the image
            under the entry's box.
        projections: per entry, ``(C, h, w)`` float32 deconvnet projection of the activation,
            or for a relevance ranking the channel's conditional relevance map at the input
            (signed, per colour channel), cropped to the same box; ``None`` when projections
            were not asked for.
    """

    layer: str
    channel: int
    entries: tuple[PatchEntry, ...]
    crops: tuple[torch.Tensor, ...]
    projections: tuple[torch.Tensor, ...] | None


# -- mining -------------------------------------------------------------------------------------


def _channel_lists(channels: ChannelsArg, counts: dict[str, int]) -> dict[str, list[int] | None]:
    chosen: dict[str, list[int] | None] = {}
    for name, count in counts.items():
        wanted: Sequence[int] | None
        if channels is None:
            wanted = None
        elif isinstance(channels, Mapping):
            wanted = channels.get(name)
        else:
            wanted = channels
        if wanted is None:
            chosen[name] = None
            continue
        # Checked one by one while collecting: the set never holds more than the layer's ids,
        # so ``range(10**15)`` fails at its first bad id instead of filling the memory.
        ids: set[int] = set()
        for item in wanted:
            channel = int(item)
            if not 0 <= channel < count:
                raise BadArgument(
                    f"--channels {channel}", f"is out of range: layer {name} has {count} channels (0..{count - 1})"
                )
            ids.add(channel)
        if not ids:
            raise BadArgument("--channels", f"no channels chosen for layer {name}")
        chosen[name] = sorted(ids)
    return chosen


def _forward(module: torch.nn.Module, x: torch.Tensor) -> None:
    # oneDNN runs a one-image batch through other convolution kernels, whose results differ in
    # the last bits from the same image in a larger batch. A lone image (the tail of a shard or
    # of a resumed pass) goes in twice, so its activations match those of any other batching.
    module(torch.cat([x, x]) if x.shape[0] == 1 else x)


@dataclass(frozen=True)
class Ranking:
    """What the lists are ranked by.

    Attributes:
        rank: ``"activation"`` or ``"relevance"``.
        target: relevance only: the explained class index, or ``PREDICTED``.
        composite: relevance only: the LRP composite (one of ``COMPOSITES``).
        uncovered: relevance only: module paths no LRP rule covers (relevance passes them as
            a plain gradient; see ``probes.lrp_rules``).
    """

    rank: str = "activation"
    target: int | str | None = None
    composite: str | None = None
    uncovered: tuple[str, ...] = ()


def check_ranking(rank: str, target: int | str | None, composite: str | None) -> None:
    """Refuse a ranking that cannot work, before any model or data is touched.

    Raises:
        BadArgument: an unknown ``rank`` or ``composite``; ``target`` missing with
            ``rank="relevance"``, or ``target``/``composite`` given with ``rank="activation"``.
    """
    if rank not in RANKS:
        raise BadArgument(f"--rank {rank}", "must be one of " + ", ".join(RANKS), close_matches(str(rank), RANKS))
    if rank == "activation":
        for flag, value in (("--target", target), ("--composite", composite)):
            if value is not None:
                raise BadArgument(flag, "only applies to --rank relevance (an activation ranking explains no class)")
        return
    if target is None:
        raise BadArgument("--target", "is required with --rank relevance",
                          f"give a class index, a class name, or {PREDICTED} (each image's top-1 class)")
    if composite is not None and composite not in COMPOSITES:
        raise BadArgument(f"--composite {composite}", "must be one of " + ", ".join(COMPOSITES),
                          close_matches(str(composite), COMPOSITES))


def _resolve_ranking(loaded: LoadedModel, shape: tuple[int, ...], rank: str, target: int | str | None,
                     composite: str | None) -> Ranking:
    """The ranking with its target checked against the model: a label becomes its index, an index
    is checked to be one of the model's classes. One probe forward under the rules reads the class
    count and the layers no rule covers."""
    if rank == "activation":
        return Ranking()
    chosen = composite or DEFAULT_COMPOSITE
    probe = torch.zeros((1, *shape), device=loaded.device, dtype=loaded.dtype).requires_grad_(True)
    with eval_mode(loaded.module), torch.enable_grad(), _rules(loaded, chosen) as rules:
        logits = loaded.module(probe).detach()
    wanted = None if target == PREDICTED else target
    try:
        # Also refuses a model whose output is not (N, classes) scores, with its own message.
        index = resolve_targets(wanted, logits, loaded.categories, loaded.name)
    except BadTarget as exc:
        if wanted is None or exc.subject == loaded.name:
            raise
        raise BadTarget(f"--target {target}", exc.reason, exc.hint) from None
    return Ranking("relevance", PREDICTED if wanted is None else int(index[0]), chosen, rules.uncovered)


def _rules(loaded: LoadedModel, composite: str) -> AbstractContextManager[LrpState]:
    """The LRP rules of ``composite`` on the model; the z-box bounds (epsilon-gamma-box) are the
    normalised values of pixels 0 and 1 under the model's preprocessing."""
    if composite == "epsilon-gamma-box":
        low, high = box_bounds(loaded.preprocess.mean, loaded.preprocess.std)
        return lrp_rules(loaded.module, composite, low=low.to(loaded.device), high=high.to(loaded.device))
    return lrp_rules(loaded.module, composite)


def _relevance_seed(logits: torch.Tensor, target: int | str | None, loaded: LoadedModel) -> torch.Tensor:
    """LRP's start: each row's target logit in its place, zeros elsewhere (``one_hot * logits``)."""
    targets = resolve_targets(None if target == PREDICTED else target, logits, loaded.categories, loaded.name)
    rows = targets[:, None]
    return torch.zeros_like(logits).scatter_(1, rows, logits.detach().gather(1, rows))


def _relevance_at(
    outputs: Sequence[torch.Tensor], logits: torch.Tensor, seed: torch.Tensor, names: Sequence[str],
    *, retain_graph: bool = False,
) -> list[torch.Tensor]:
    """The relevance arriving at each captured layer output, from one backward pass."""
    for name, output in zip(names, outputs, strict=True):
        if not output.requires_grad:
            raise UnknownLayer(name, "is not differentiable (its output is detached from the graph)")
    grads = torch.autograd.grad(logits, list(outputs), grad_outputs=seed, retain_graph=retain_graph,
                                allow_unused=True)
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            raise UnknownLayer(name, "does not influence the class score", "pick a layer before the classifier")
    return [grad for grad in grads if grad is not None]


@dataclass(frozen=True)
class _Plan:
    loaded: LoadedModel
    source: ImageSource
    names: list[str]
    paths: dict[str, str]
    modules: dict[str, torch.nn.Module]
    layouts: dict[str, Layout]
    counts: dict[str, int]
    grids: dict[str, tuple[int, int]]
    geometry: dict[str, Geometry]
    chosen: dict[str, list[int] | None]
    input_size: tuple[int, int]
    shape: tuple[int, ...]
    last: str | None  # the mined layer run last, when each mined module runs exactly once per pass


def _plan(model: ModelLike, data: Any, layers: str | Sequence[str], channels: ChannelsArg) -> _Plan:
    loaded = as_loaded(model)
    source = open_source(data, loaded.preprocess)
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not names:
        raise BadArgument("--layer", "give at least one layer")
    shape = tuple(source.images.shape[1:]) if isinstance(source, TensorSource) else loaded.preprocess.input_size
    found = {name: map_layer(loaded, name, shape) for name in names}
    resolved = {name: (layer.path, layer.module) for name, layer in found.items()}
    layouts = {name: layer.layout for name, layer in found.items()}
    probe_input = torch.zeros((1, *shape), device=loaded.device, dtype=loaded.dtype)
    modules = {name: module for name, (_, module) in resolved.items()}
    called: list[str] = []  # the mined layers in the order the probe pass ran them
    with capture(loaded.module, modules, layouts=layouts) as probe, \
            reduce_outputs(loaded.module, modules, lambda name, _: called.append(name)):
        by_path = layer_geometries(loaded.module, probe_input, sorted({p for p, _ in resolved.values()}))
    outputs = {name: feature_map_of(probe, name, name) for name in names}
    counts = {name: int(out.shape[1]) for name, out in outputs.items()}
    return _Plan(
        loaded=loaded,
        source=source,
        names=names,
        paths={name: path for name, (path, _) in resolved.items()},
        modules={name: module for name, (_, module) in resolved.items()},
        layouts=layouts,
        counts=counts,
        grids={name: (int(out.shape[2]), int(out.shape[3])) for name, out in outputs.items()},
        geometry={name: by_path[path] for name, (path, _) in resolved.items()},
        chosen=_channel_lists(channels, counts),
        input_size=(int(shape[-2]), int(shape[-1])),
        shape=tuple(int(n) for n in shape),
        # A module run twice (a shared ReLU) or not at all gives no safe place to stop.
        last=called[-1] if sorted(called) == sorted(names) else None,
    )


def top_patches(
    model: ModelLike,
    data: Any,
    layers: str | Sequence[str],
    top: int = 9,
    channels: ChannelsArg = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress | None = None,
    *,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    rank: str = "activation",
    target: int | str | None = None,
    composite: str | None = None,
    statistics: bool = False,
) -> PatchIndex:
    """Mine the ``top`` strongest activations (or most relevant channels) of ``layers`` over a dataset.

    One forward pass per batch serves all layers (and for ``rank="relevance"`` one backward).
    Under torchrun (an initialised process group, see ``convscope.distributed``) each rank mines
    its shard and every rank returns the merged index.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module``.
        data: a folder, an image file, a text file of paths, a list of paths,
            ``"fashion-mnist[:train|:test]"``, a normalised ``(N, C, H, W)`` tensor or an
            ``ImageSource`` (see ``dataset.sources.open_source``).
        layers: one layer name (alias or module path) or several.
        top: entries per channel.
        channels: channel ids for every layer, or layer -> ids; ``None``: all channels.
        batch_size: images per forward pass.
        workers: DataLoader processes decoding image files (0: in this process).
        progress: called with the number of source images covered by each batch.
        checkpoint: folder for this rank's running state (``state-rank{r}-of-{n}.pt``), written
            atomically every ``checkpoint_every`` batches, at the end and on Ctrl-C. Nothing in it
            is ever deleted here (see ``release_state_folder``).
        resume: continue from the state in ``checkpoint`` when there is one; it must have been
            made with the same settings (ranking included), weights and images.
        rank: ``"activation"`` (the channel's maximum over its map) or ``"relevance"`` (its
            conditional relevance for ``target``, CRP; see the module docstring).
        target: with ``rank="relevance"`` (required there, refused otherwise): a class index, a
            class name, or ``"predicted"`` for each image's own top-1 class.
        composite: with ``rank="relevance"``: the LRP composite, one of ``COMPOSITES``
            (default ``epsilon-plus-flat``).
        statistics: also measure each mined channel over the whole dataset in the same pass
            (``PatchIndex.statistics``: mean activation, largest activation, fraction of images
            where it fires); activation ranking only. Checkpointed and merged over ranks with
            the tables.

    Returns:
        the ``PatchIndex``.

    Raises:
        UnknownLayer: a bad layer, or one whose output is not a ``(N, C, h, w)`` feature map.
        BadArgument: bad ``top``, ``batch_size``, ``workers``, channels or ranking; a checkpoint
            made with other settings, other weights or over other images.
        BadTarget: a ``target`` that is not a class of the model.
        DataError: nothing to read.
    """
    if top < 1:
        raise BadArgument(f"--top {top}", "must be at least 1")
    if batch_size < 1:
        raise BadArgument(f"--batch-size {batch_size}", "must be at least 1")
    if workers < 0:
        raise BadArgument(f"--workers {workers}", "must be 0 or more")
    if checkpoint_every < 1:
        raise BadArgument(f"--checkpoint-every {checkpoint_every}", "must be at least 1")
    check_ranking(rank, target, composite)
    if statistics and rank != "activation":
        raise BadArgument("statistics", "are measured on activations: use rank='activation'")
    plan = _plan(model, data, layers, channels)
    ranking = _resolve_ranking(plan.loaded, plan.shape, rank, target, composite)
    loaded, source = plan.loaded, plan.source
    device = loaded.device
    world = current_world()
    shard = shard_range(len(source), world.rank, world.size)
    chosen_index = {
        name: None if ids is None else torch.tensor(ids, dtype=torch.int64, device=device)
        for name, ids in plan.chosen.items()
    }
    # A table holds at most one entry per image: a ``top`` beyond the dataset allocates nothing more.
    width = min(top, len(source))
    path = state_path(checkpoint, world) if checkpoint is not None else None
    config = {
        "model": loaded.name,
        "weights": loaded.weights,
        # Only for checkpoints: hashing the weights and stating every file costs a little.
        "weights_sha256": weights_digest(loaded.module) if path is not None else None,
        "source": source.description,
        "count": len(source),
        "images_sha256": source.fingerprint() if path is not None else None,
        "layers": [plan.paths[name] for name in plan.names],
        "channels": [plan.chosen[name] for name in plan.names],
        "top": top,
        "batch_size": batch_size,
        # ("rank" is the process's rank below.) A relevance table is no activation table, and a
        # class's relevance no other class's: all three are part of what a state is a state of.
        "ranking": ranking.rank,
        "target": ranking.target,
        "composite": ranking.composite,
        "rank": world.rank,
        "world": world.size,
    }
    if statistics:  # only then: a checkpoint of a run without them stays resumable as before
        config["statistics"] = list(STATISTICS)
    state: MinerState | None = None
    if resume and path is not None and path.is_file():
        state = load_state(path, config, device)
    if state is None:
        tables = {
            name: TopkTable.empty(len(ids) if ids is not None else plan.counts[name], width, device)
            for name, ids in plan.chosen.items()
        }
        stats = {
            name: empty_statistics(len(ids) if ids is not None else plan.counts[name], device)
            for name, ids in plan.chosen.items()
        } if statistics else None
        state = MinerState(shard.start, 0, (), tables, stats)
    elif progress is not None and state.position > shard.start:
        progress(state.position - shard.start)

    committed = state
    since_save = 0
    with ExitStack() as stack:
        stack.enter_context(eval_mode(loaded.module))
        if ranking.rank == "relevance":
            mine = _relevance_miner(stack, plan, chosen_index, ranking)
        else:
            mine = _activation_miner(stack, plan, chosen_index)
        try:
            for batch in source.batches(range(state.position, shard.stop), batch_size, workers):
                tables, stats = committed.tables, committed.stats
                if len(batch.indices):
                    tables, stats = mine(batch.images.to(device=device, dtype=loaded.dtype), batch.indices, tables,
                                         stats)
                # One assignment, so an interrupt never leaves a half-updated state to save.
                committed = MinerState(
                    committed.position + batch.consumed,
                    committed.images + len(batch.indices),
                    committed.skipped + batch.failed,
                    tables,
                    stats,
                )
                if progress is not None:
                    progress(batch.consumed)
                since_save += 1
                if path is not None and since_save >= checkpoint_every:
                    save_state(path, config, committed)
                    since_save = 0
        except KeyboardInterrupt:
            if path is not None:
                save_state(path, config, committed)
            raise
    if path is not None and since_save:
        save_state(path, config, committed)
    return _finish(plan, committed, world, top, ranking)


Miner = Callable[
    [torch.Tensor, torch.Tensor, dict[str, TopkTable], dict[str, torch.Tensor] | None],
    tuple[dict[str, TopkTable], dict[str, torch.Tensor] | None],
]


STATISTICS = ("mean", "max", "firing")  # the columns of a layer's running statistics, in order


def channel_statistics(maps: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    """A batch's share of each channel's dataset statistics: ``(C, 3)`` float64 of the sum over
    images of the map's spatial mean, the largest cell, and the number of images with a cell
    above 0 (see ``STATISTICS``). Added (the max column: maximised) into the running total by
    ``merge_statistics``; NaN maps count as never firing and never largest."""
    if chosen is not None:
        maps = maps.index_select(1, chosen)
    flat = torch.nan_to_num(maps.flatten(2).double(), nan=0.0)
    peaks = torch.nan_to_num(maps.flatten(2).amax(2).double(), nan=float("-inf"))  # (B, C)
    return torch.stack([flat.mean(2).sum(0), peaks.amax(0), (peaks > 0).sum(0).double()], 1)


def empty_statistics(channels: int, device: torch.device) -> torch.Tensor:
    """The running statistics before any image: zero sums, a max of -inf."""
    stats = torch.zeros((channels, 3), dtype=torch.float64, device=device)
    stats[:, 1] = float("-inf")
    return stats


def merge_statistics(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine running statistics (of batches, shards or ranks): sums add, maxima take the max."""
    total = parts[0].clone()
    for part in parts[1:]:
        total[:, 0] += part[:, 0]
        total[:, 2] += part[:, 2]
        total[:, 1] = torch.maximum(total[:, 1], part[:, 1])
    return total


def _activation_miner(stack: ExitStack, plan: _Plan, chosen: dict[str, torch.Tensor | None]) -> Miner:
    """``(images, positions, tables) -> tables`` merging each channel's maximum; its hooks on ``stack``.

    Each mined layer's hook keeps only the entries that can enter its table (``candidates``);
    after the pass one ``merge_candidates`` updates all tables. When every mined module runs
    once per pass, the pass stops after the last of them: the rest of the network cannot change
    what was mined.
    """
    current: dict[str, Any] = {}  # the batch in flight: its image positions and the tables it starts from

    def reduce(name: str, output: torch.Tensor) -> tuple[Candidates, torch.Tensor | None]:
        # In the hook, on the module's own output: nothing downstream has run, so no copy is kept.
        maps = output[: len(current["positions"])]
        found = candidates(maps, chosen[name], current["tables"][name].values[:, -1])
        stats = current["stats"]
        return found, None if stats is None else merge_statistics([stats[name], channel_statistics(maps, chosen[name])])

    stack.enter_context(torch.no_grad())
    network, modules = _mining_network(plan)
    found = stack.enter_context(reduce_outputs(network, modules, reduce, layouts=plan.layouts))
    if plan.last is not None:
        # Entered after ``reduce_outputs``: hooks run in registration order, so the last
        # layer's reduction has run when this one stops the pass.
        stack.enter_context(stop_after(modules[plan.last]))

    def mine(images: torch.Tensor, positions: torch.Tensor, tables: dict[str, TopkTable],
             stats: dict[str, torch.Tensor] | None) -> tuple[dict[str, TopkTable], dict[str, torch.Tensor] | None]:
        found.clear()
        current.update(positions=positions, tables=tables, stats=stats)
        try:
            _forward(network, images)
        except StopForward:  # after the last mined layer: the rest cannot change the tables
            pass
        results = [found.last(name) for name in plan.names]  # a module called twice: its last call
        merged = merge_candidates([tables[name] for name in plan.names], [result[0] for result in results], positions)
        new_stats = None if stats is None else {name: result[1] for name, result in zip(plan.names, results, strict=True)}
        return dict(zip(plan.names, merged, strict=True)), new_stats

    return mine


def _mining_network(plan: _Plan) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The network the activation miner runs and its mined modules: the inference copy with
    BatchNorm folded into the convolutions and the activations run inside them (``probes.fold``,
    ``fuse=True``: two passes over each map fewer; zfnet_mnist's forward 0.34 s -> 0.31 s per 4096
    images with the allocator tuned, 0.63 s untuned; activations equal to float32 rounding), or
    with BatchNorm folded only, unless a mined layer's output is one the copy changes (a
    convolution's own, before its BatchNorm or activation); else the model itself."""
    loaded = plan.loaded
    example = torch.zeros((1, *plan.shape), device=loaded.device, dtype=loaded.dtype)
    for fuse in (True, False):
        folded = fold_batchnorm(loaded.module, example, fuse=fuse)
        if folded.module is not loaded.module and not any(folded.changes(path) for path in plan.paths.values()):
            return folded.module, {name: folded.module.get_submodule(path) for name, path in plan.paths.items()}
    return loaded.module, plan.modules


def _relevance_miner(stack: ExitStack, plan: _Plan, chosen: dict[str, torch.Tensor | None], ranking: Ranking) -> Miner:
    """``(images, positions, tables) -> tables`` merging each channel's relevance for the target:
    one forward and one LRP backward per batch give the relevance at every mined layer."""
    loaded = plan.loaded
    stack.enter_context(torch.enable_grad())
    stack.enter_context(_rules(loaded, ranking.composite or DEFAULT_COMPOSITE))
    store = stack.enter_context(capture(loaded.module, plan.modules, mode="graph", layouts=plan.layouts))

    def mine(images: torch.Tensor, positions: torch.Tensor, tables: dict[str, TopkTable],
             stats: dict[str, torch.Tensor] | None) -> tuple[dict[str, TopkTable], dict[str, torch.Tensor] | None]:
        store.clear()
        count = images.shape[0]
        # A lone image goes in twice, for the reason ``_forward`` gives; the rows do not interact.
        x = (torch.cat([images, images]) if count == 1 else images).detach().requires_grad_(True)
        logits = loaded.module(x)
        seed = _relevance_seed(logits, ranking.target, loaded)
        outputs = [feature_map_of(store, name, name) for name in plan.names]
        relevance = _relevance_at(outputs, logits, seed, plan.names)
        store.clear()  # the graph goes with the batch
        return {
            name: tables[name].update(*relevance_peaks(maps[:count].detach(), chosen[name]), positions)
            for name, maps in zip(plan.names, relevance, strict=True)
        }, stats

    return mine


def _finish(plan: _Plan, state: MinerState, world: World, top: int, ranking: Ranking) -> PatchIndex:
    width = min(top, len(plan.source))
    tables = state.tables
    stats = state.stats
    images = state.images
    skipped = list(state.skipped)
    if world.distributed:
        merged = {}
        for name in plan.names:
            table = tables[name]
            values, positions, cells = merge_topk(
                torch.cat(world.all_gather(table.values), 1),
                torch.cat(world.all_gather(table.images), 1),
                torch.cat(world.all_gather(table.cells), 1),
                width,
            )
            merged[name] = TopkTable(values, positions, cells)
        tables = merged
        if stats is not None:
            stats = {name: merge_statistics(world.all_gather(stats[name])) for name in plan.names}
        gathered = world.all_gather_object((state.images, list(state.skipped)))
        images = sum(count for count, _ in gathered)
        skipped = sorted((item for _, items in gathered for item in items), key=lambda s: s[0])

    source = plan.source
    lists: dict[str, tuple[tuple[PatchEntry, ...], ...]] = {}
    channel_ids: dict[str, tuple[int, ...]] = {}
    for name in plan.names:
        table = tables[name]
        value_rows = table.values.cpu().tolist()
        position_rows = table.images.cpu().tolist()
        cell_rows = table.cells.cpu().tolist()
        _, width = plan.grids[name]
        rows_out = []
        for row_values, row_positions, row_cells in zip(value_rows, position_rows, cell_rows, strict=True):
            kept = [(v, p, c) for v, p, c in zip(row_values, row_positions, row_cells, strict=True)
                    if p != EMPTY and v != float("-inf")]
            ys = [c // width for _, _, c in kept]
            xs = [c % width for _, _, c in kept]
            boxes = cell_boxes_xyxy(plan.geometry[name], ys, xs, plan.input_size)
            rows_out.append(tuple(
                PatchEntry(source.key(p), p, float(v), (y, x), box)
                for (v, p, _), y, x, box in zip(kept, ys, xs, boxes, strict=True)
            ))
        lists[name] = tuple(rows_out)
        ids = plan.chosen[name]
        channel_ids[name] = tuple(ids) if ids is not None else tuple(range(plan.counts[name]))
    return PatchIndex(
        model=plan.loaded.name,
        source=source.description,
        images=images,
        skipped=tuple((source.key(i), reason) for i, reason in skipped),
        layers=lists,
        channels=channel_ids,
        chosen=any(ids is not None for ids in plan.chosen.values()),
        top=top,
        input_size=plan.input_size,
        boxes_exact={name: plan.geometry[name].exact for name in plan.names},
        rank=ranking.rank,
        target=ranking.target,
        label=_class_name(plan.loaded, ranking.target),
        composite=ranking.composite,
        uncovered=ranking.uncovered,
        counts=dict(plan.counts),
        statistics=None if stats is None else {
            name: _statistics_rows(stats[name], images) for name in plan.names
        },
    )


def _statistics_rows(stats: torch.Tensor, images: int) -> tuple[dict[str, float], ...]:
    """One ``{"mean", "max", "firing"}`` per channel from the running sums over ``images`` images."""
    rows = []
    for total, peak, fired in stats.cpu().tolist():
        rows.append({
            "mean": total / images if images else float("nan"),
            "max": peak if images else float("nan"),
            "firing": fired / images if images else float("nan"),
        })
    return tuple(rows)


def _class_name(loaded: LoadedModel, target: int | str | None) -> str | None:
    if isinstance(target, int) and target < len(loaded.categories):
        return str(loaded.categories[target])
    return None


# -- projections ---------------------------------------------------------------------------------

# Decoded winners kept for their next use: an image wins in many channels (with 256 photos and
# 192 channels, each photo about 7 times), and decoding it again each time cost more than the
# whole mining pass. 256 MiB holds about 440 EfficientNet inputs.
RELOAD_CACHE_BYTES = 256 * 2**20


class _Winners:
    """The network inputs of the winners, each image decoded once while a later entry still needs it.

    The future uses are known (the whole list of entries), so an input is kept only while it has
    a use left, and dropped at its last one; past ``budget`` bytes an image is simply loaded again.
    Rows are the source's own (``ImageSource.load`` per image), so the batch is the same tensor.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.left = Counter(indices)
        self.kept: dict[int, torch.Tensor] = {}
        self.budget = RELOAD_CACHE_BYTES
        self.used = 0

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """``(len(indices), C, H, W)`` network input, as ``source.load(indices)``."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.kept]
        loaded = self.source.load(missing) if missing else None
        fresh = {} if loaded is None else dict(zip(missing, loaded, strict=True))
        if loaded is not None and missing == list(indices):
            batch = loaded
        else:
            # Assembled by numpy: one serial copy, where torch.stack's parallel copies each wait for
            # a second core on a busy machine (measured 0.5 s instead of 17 ms for 64 rows).
            batch = torch.from_numpy(np.stack([(self.kept[i] if i in self.kept else fresh[i]).numpy() for i in indices]))
        for i in indices:
            self.left[i] -= 1
        for i in dict.fromkeys(indices):
            if self.left[i] == 0:
                dropped = self.kept.pop(i, None)
                self.used -= 0 if dropped is None else dropped.nbytes
            elif i not in self.kept and self.used + fresh[i].nbytes <= self.budget:
                # A clone: a row of the loaded batch would keep the whole batch's storage alive.
                self.kept[i] = fresh[i].clone()
                self.used += self.kept[i].nbytes
        return batch



def collect_patches(
    model: ModelLike,
    data: Any,
    index: PatchIndex,
    *,
    layers: Sequence[str] | None = None,
    projections: bool = True,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Iterator[ChannelPatches]:
    """Load the winners of ``index`` again and yield each channel's crops and projections.

    Only the winning images are read, ``batch_size`` entries at a time, each image decoded once
    while a later entry still needs it (within ``RELOAD_CACHE_BYTES``), with one deconvnet
    backward per batch, or for a relevance index one LRP pass giving each entry's conditional
    relevance map (``conditional_relevance``). Channels come out layer by layer in channel order,
    each as soon as its entries are done, so memory stays one batch and that cache.

    Args:
        data: the same data ``index`` was mined from.
        layers: the layers to show (default: all of ``index``).
        projections: ``False`` gives the crops only (no model pass at all).
        progress: called with the number of entries done after each batch.
    """
    from convscope.methods.deconvnet import project_cells

    loaded = as_loaded(model)
    source = open_source(data, loaded.preprocess)
    if batch_size < 1:
        raise BadArgument(f"--batch-size {batch_size}", "must be at least 1")
    names = layers if layers is not None else list(index.layers)
    winners = _Winners(source, [entry.index for name in names for entries in index.layers[name] for entry in entries])
    for name in names:
        lists = index.layers[name]
        ids = index.channels[name]
        rows = [(slot, entry) for slot, entries in enumerate(lists) for entry in entries]
        crops: dict[int, list[torch.Tensor]] = {}
        projected: dict[int, list[torch.Tensor]] = {}
        next_slot = 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = winners.load([entry.index for _, entry in chunk]).to(device=loaded.device, dtype=loaded.dtype)
            display = loaded.preprocess.to_display(batch).float().cpu()
            result = None
            chunk_channels = torch.tensor([ids[slot] for slot, _ in chunk], dtype=torch.int64)
            if projections and index.rank == "relevance":
                result = conditional_relevance(
                    loaded, batch, name, chunk_channels, index.target, index.composite or DEFAULT_COMPOSITE)
            elif projections:
                result = project_cells(
                    loaded, batch, name, chunk_channels,
                    torch.tensor([entry.cell for _, entry in chunk], dtype=torch.int64),
                )
            # Cropped by numpy, for the reason ``_Winners.load`` gives: a crop is a small copy.
            display_pixels = display.numpy()
            result_pixels = None if result is None else result.numpy()
            for i, (slot, entry) in enumerate(chunk):
                x0, y0, x1, y1 = entry.box
                crops.setdefault(slot, []).append(torch.from_numpy(display_pixels[i, :, y0:y1, x0:x1].copy()))
                if result_pixels is not None:
                    projected.setdefault(slot, []).append(torch.from_numpy(result_pixels[i, :, y0:y1, x0:x1].copy()))
            if progress is not None:
                progress(len(chunk))
            done_through = chunk[-1][0] if start + batch_size >= len(rows) else chunk[-1][0] - 1
            while next_slot <= done_through:
                yield _channel(name, ids[next_slot], lists[next_slot], crops, projected, next_slot, projections)
                next_slot += 1
        while next_slot < len(lists):  # channels with no entries
            yield _channel(name, ids[next_slot], lists[next_slot], crops, projected, next_slot, projections)
            next_slot += 1


def _channel(
    name: str, channel: int, entries: tuple[PatchEntry, ...], crops: dict[int, list[torch.Tensor]],
    projected: dict[int, list[torch.Tensor]], slot: int, projections: bool,
) -> ChannelPatches:
    return ChannelPatches(
        layer=name,
        channel=channel,
        entries=entries,
        crops=tuple(crops.pop(slot, [])),
        projections=tuple(projected.pop(slot, [])) if projections else None,
    )


def conditional_relevance(
    model: ModelLike, images: torch.Tensor, layer: str, channels: torch.Tensor, target: int | str | None,
    composite: str = DEFAULT_COMPOSITE,
) -> torch.Tensor:
    """CRP's conditional heatmap of one channel per image: its relevance, propagated to the input.

    Row ``i`` propagates the LRP relevance of ``target`` down to ``layer``, keeps only channel
    ``channels[i]`` there, and carries it on to the input with the same rules. All rows share one
    forward pass and one backward (in two halves: logits to the layer, the layer to the input);
    to see several channels of one image, repeat the image. Only relevance passing through the
    layer reaches the input (see the module docstring).

    Args:
        images: a normalised ``(N, C, H, W)`` batch (repeats allowed).
        channels: ``(N,)`` int64 channel per row.
        target: a class index, or ``"predicted"`` (each row's top-1 class).
        composite: one of ``COMPOSITES``.

    Returns:
        ``(N, C, H, W)`` float32 input relevance on the CPU, signed.

    Raises:
        UnknownLayer: as ``top_patches``.
    """
    loaded = as_loaded(model)
    mapped = map_layer(loaded, layer, tuple(images.shape[1:]))
    with ExitStack() as stack:
        stack.enter_context(eval_mode(loaded.module))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_rules(loaded, composite))
        store = stack.enter_context(
            capture(loaded.module, {layer: mapped.module}, mode="graph", layouts={layer: mapped.layout}))
        x = images.detach().requires_grad_(True)
        logits = loaded.module(x)
        output = feature_map_of(store, layer, layer)
        (relevance,) = _relevance_at([output], logits, _relevance_seed(logits, target, loaded), [layer],
                                     retain_graph=True)
        rows = torch.arange(output.shape[0], device=output.device)
        kept = torch.zeros_like(relevance)
        kept[rows, channels.to(output.device)] = relevance[rows, channels.to(output.device)]
        (heatmap,) = torch.autograd.grad(output, x, grad_outputs=kept)
    return heatmap.detach().float().cpu()  # the rules' backward may have built a graph of its own
