"""The unit atlas's computing parts: feature visualisations in resumable chunks split over ranks,
and each unit's class selectivity. Pure tensors and numbers; ``cli/atlas_cmd.py`` composes them
with the miner (``dataset.patches``) and draws (``render/``).

**Feature visualisations in chunks.** A layer's units are cut into chunks of ``chunk`` units in
unit order, the same cut whatever the number of processes, and each chunk is one batched
optimisation (``methods.featurevis``). Under torchrun the chunks (of every layer and kind, in
order) are dealt round-robin to the ranks.
Each finished chunk is saved atomically in the state folder, with the settings it was made
with; a resumed run loads the chunks already there (refusing ones made with other settings) and
computes the rest. Each unit draws its random numbers from its own seeded generator, and a chunk
is the same batch in every run, so an interrupted and resumed atlas, or one split over processes,
ends with the same pictures as one uninterrupted run.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from convscope.atomic import atomic_write
from convscope.distributed import World
from convscope.errors import BadArgument
from convscope.types import LoadedModel

KINDS = {"featurevis": "channel", "negative": "negative"}  # atlas picture -> featurevis objective
STATE_PATTERN = r"featurevis-[0-9]+-(?:featurevis|negative)-[0-9]+\.pt"


def chunk_name(layer_index: int, kind: str, chunk: int) -> str:
    """The state file of one chunk (``STATE_PATTERN``)."""
    return f"featurevis-{layer_index}-{kind}-{chunk}.pt"


def chunks_of(units: Sequence[int], chunk: int) -> list[list[int]]:
    """``units`` cut into consecutive chunks of ``chunk`` (the last may be shorter)."""
    return [list(units[start : start + chunk]) for start in range(0, len(units), chunk)]


def state_names(layers: Sequence[Sequence[int]], chunk: int) -> list[str]:
    """Every chunk file an atlas over these layers' units will write."""
    return [
        chunk_name(i, kind, c)
        for i, units in enumerate(layers)
        for kind in KINDS
        for c in range(len(chunks_of(units, chunk)))
    ]


def _load_chunk(path: Path, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: not ours, or damaged
        raise BadArgument("--resume", f"cannot read the checkpoint {path}: {type(exc).__name__}") from exc
    if not isinstance(raw, dict) or raw.get("settings") != settings:
        raise BadArgument("--resume", f"the checkpoint {path} was made with other feature visualisation settings",
                          "run again without --resume to start over")
    return {"images": raw["images"], "final": raw["final"]}


def feature_visualizations(
    loaded: LoadedModel,
    layers: Sequence[tuple[str, Sequence[int]]],
    *,
    world: World,
    state: Path | None,
    resume: bool,
    chunk: int,
    settings: dict[str, Any],
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[str, str], dict[str, torch.Tensor]] | None:
    """The feature visualisation and the negative one of every unit of ``layers``.

    Args:
        layers: ``(layer name, unit ids)`` pairs.
        state: the folder of the chunk files (``None``: nothing saved).
        resume: load the chunks already in ``state`` (made with the same settings).
        chunk: units per batched optimisation.
        settings: ``feature_visualization`` keywords (steps, size, parameterization, ...), saved with
            each chunk and checked on resume; also what distinguishes one atlas from another.
        progress: called with optimisation steps done (a chunk of ``steps`` adds ``steps``).

    Returns:
        on rank 0, ``(layer, kind) -> {"images": (N, 3, H, W) in [0, 1], "final": (N,)}`` in unit
        order, ``kind`` being ``"featurevis"`` or ``"negative"``; ``None`` on the other ranks.
    """
    from convscope.methods.featurevis import feature_visualization

    jobs = [
        (i, name, kind, c, units)
        for i, (name, all_units) in enumerate(layers)
        for kind in KINDS
        for c, units in enumerate(chunks_of(all_units, chunk))
    ]
    computed: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}
    for j, (i, name, kind, c, units) in enumerate(jobs):
        if j % world.size != world.rank:  # the jobs dealt round-robin: each rank a share of the units
            continue
        path = state / chunk_name(i, kind, c) if state is not None else None
        if resume and path is not None and path.is_file():
            computed[(i, kind, c)] = _load_chunk(path, settings)
            if progress is not None:
                progress(int(settings["steps"]))
            continue
        result = feature_visualization(loaded, name, units, objective=KINDS[kind], progress=progress, **settings)
        part = {"images": result.images.detach().float().cpu().contiguous(),
                "final": result.final.detach().double().cpu().contiguous()}
        if path is not None:
            buffer = io.BytesIO()
            torch.save({"settings": settings, **part}, buffer)
            atomic_write(path, buffer.getvalue())
        computed[(i, kind, c)] = part
    gathered = world.all_gather_object(computed) if world.distributed else [computed]
    if not world.is_rank0:
        return None
    everything: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}
    for share in gathered:
        everything.update(share)
    results: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for i, (name, all_units) in enumerate(layers):
        for kind in KINDS:
            pieces = [everything[(i, kind, c)] for c in range(len(chunks_of(all_units, chunk)))]
            results[(name, kind)] = {
                "images": torch.cat([p["images"] for p in pieces]),
                "final": torch.cat([p["final"] for p in pieces]),
            }
    return results


def class_counts(
    positions: Sequence[int], classes: dict[int, int], categories: Sequence[str], *, limit: int | None = None,
) -> list[dict[str, Any]]:
    """The classes of a unit's top images, most frequent first (ties: lower class id), with counts.

    Args:
        positions: the images' positions in the source.
        classes: position -> its class (the dataset's label or the model's top-1).
        categories: the model's class names (``label`` is left out beyond them).
        limit: at most this many classes (default: all of them).
    """
    counts = Counter(classes[p] for p in positions if p in classes)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]  # [:None] keeps all
    rows: list[dict[str, Any]] = []
    for index, count in ordered:
        row: dict[str, Any] = {"class": index}
        if index < len(categories):
            row["label"] = str(categories[index])
        row["count"] = count
        rows.append(row)
    return rows


def predicted_classes(loaded: LoadedModel, load: Callable[[Sequence[int]], torch.Tensor], positions: Sequence[int],
                      *, batch_size: int = 32) -> dict[int, int]:
    """The model's top-1 class of each image at ``positions`` (loaded again with ``load``)."""
    from convscope.methods.predict import classify

    wanted = sorted(set(positions))
    classes: dict[int, int] = {}
    for start in range(0, len(wanted), batch_size):
        part = wanted[start : start + batch_size]
        images = load(part).to(device=loaded.device, dtype=loaded.dtype)
        # ``classify`` folds BatchNorm for a batch of more than one; a lone image goes in twice so
        # that the class does not depend on how the positions were cut into batches.
        doubled = len(part) == 1
        predictions = classify(loaded, torch.cat([images, images]) if doubled else images, topk=1,
                               batch_size=batch_size + 1)
        for position, prediction in zip(part, predictions, strict=False):
            classes[position] = int(prediction.indices[0])
    return classes
