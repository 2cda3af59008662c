"""CLI command ``atlas``: a browsable page for every chosen unit of a model, on the user's data.

For each unit (channel) of the chosen layers: the top dataset patches with their deconvnet
projections and, unless ``--no-relevance``, the relevance-ranked ones (CRP); the feature
visualisation and the negative one; the unit's statistics over the dataset. Writes the pictures,
``atlas.json`` (docs/atlas-format.md), the static site (``index.html`` -> layer pages -> unit
pages) and ``manifest.json`` last.

Parts and where they resume from after a kill (``--resume``):
1. mining with statistics, one pass (``dataset.patches.top_patches``), checkpointed in
   ``OUTPUT/.atlas-state``;
2. the relevance ranking, a second pass, checkpointed in ``OUTPUT/.atlas-relevance-state``;
3. the feature visualisations, in chunks of units, each chunk saved in ``.atlas-state``
   (``dataset.atlas``);
4. the classes of the top images, the pictures, the site (rank 0; fast, redone on resume).
Under torchrun the mining passes are split by images and the feature visualisations by chunks of
units; rank 0 draws and writes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from convscope.cli.common import open_model
from convscope.cli.options import DeviceOpt, ModelOpt, OutDirOpt, OutputIndexOpt, SeedOpt, WeightsOpt
from convscope.cli.output import OutputDir, prepare_folder, safe_name
from convscope.cli.patches_cmd import COMPOSITES, MAX_LISTED, claim_state_folders, listed, parse_channels
from convscope.cli.progress import progress_bar
from convscope.errors import BadArgument, DataError

STATE_FOLDER = ".atlas-state"
RELEVANCE_STATE_FOLDER = ".atlas-relevance-state"
MAX_STEPS = 10_000  # methods.featurevis.MAX_STEPS and MAX_SIZE (kept here: the options parse before torch loads)
MAX_SIZE = 1024
MIN_TILE = 64  # patch pictures are enlarged (nearest neighbour) to at least this side


def _sig(value: float | None) -> float | None:
    """6 significant digits (a run split over processes writes the same bytes); NaN/inf -> None."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def atlas_command(
    data: Annotated[
        str,
        typer.Argument(help="Image folder (searched recursively), text file with one image path per line, "
                       "or fashion-mnist[:train|:test].", show_default=False),
    ],
    layer: Annotated[
        list[str],
        typer.Option("--layer", "-l", help="Layer alias or module path; repeat for several (one pass mines all)."),
    ],
    output: OutDirOpt = Path("convscope-atlas"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
    channels: Annotated[
        str | None, typer.Option("--channels", help="Units of every layer, e.g. 0-31 or 3,7,10-12 (default: all).")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=1, max=100, help="Dataset patches per unit.")] = 9,
    featurevis_steps: Annotated[
        int, typer.Option("--featurevis-steps", min=1, max=MAX_STEPS, help="Optimisation steps of each feature "
                          "visualisation (and of each negative one).")
    ] = 256,
    featurevis_size: Annotated[
        int | None, typer.Option("--featurevis-size", min=16, max=MAX_SIZE, help="Side of the feature "
                                 "visualisations in pixels (default: the model's input size).")
    ] = None,
    featurevis_batch: Annotated[
        int, typer.Option("--featurevis-batch", min=1, max=4096, help="Units optimised together in one batch.")
    ] = 32,
    no_relevance: Annotated[
        bool, typer.Option("--no-relevance", help="Skip the relevance-ranked patches (a second pass: forward and "
                           "LRP backward over the data).")
    ] = False,
    composite: Annotated[
        str | None, typer.Option("--composite", help=f"LRP rules of the relevance ranking, {', '.join(COMPOSITES)} "
                                 f"(default {COMPOSITES[0]}).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Processes decoding image files (0: in the main process).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoints in the output folder.")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Batches between checkpoints of the mining passes.")
    ] = 50,
) -> None:
    """A page for every unit: what each channel of your model detects, on your data.

    For every chosen unit: its top-9 dataset patches beside their deconvnet projections, the
    top-9 ranked by relevance for each image's predicted class (CRP), its feature
    visualisation and the negative one (optimised images), and its statistics over the data
    (mean and largest activation, how often it fires, the classes of its top images).

    Writes atlas.json (the index, documented in docs/atlas-format.md), the pictures under
    LAYER/unit_K/, a static site that reads offline (index.html -> one page per layer, sortable
    by the statistics -> one page per unit) and manifest.json, last. `convscope serve --atlas
    OUTPUT` browses it in the web app. After an interruption (even a kill) run the same command
    with --resume: mining and finished chunks of feature visualisations are not redone. Under
    torchrun --nproc-per-node N -m convscope atlas ... the ranks share the mining and the units.

    Examples: convscope atlas photos/ --layer stage3 --layer stage5 --channels 0-31 -o atlas/ |
    convscope atlas fashion-mnist --model zfnet_mnist --weights runs/fm/best.pt --layer conv1 --layer conv5 -o atlas/
    """
    chosen = parse_channels(channels)
    if composite is not None and no_relevance:
        raise BadArgument("--composite", "needs the relevance ranking (drop --no-relevance)")
    if composite is not None and composite not in COMPOSITES:
        raise BadArgument(f"--composite {composite}", f"unknown composite (use one of {', '.join(COMPOSITES)})")
    settings: dict[str, Any] = {
        "steps": featurevis_steps, "size": featurevis_size, "parameterization": "fft", "decorrelate": True,
        "transforms": "standard", "lr": 0.05, "seed": seed,
    }
    from convscope.methods.featurevis import check_options

    check_options(**settings)  # before any mining: a size the optimiser refuses is one line at once
    prepare_folder(output)

    from convscope.dataset.atlas import feature_visualizations, state_names
    from convscope.dataset.patches import top_patches
    from convscope.dataset.sources import open_source
    from convscope.dataset.state import claim_state_folder, release_state_folder
    from convscope.distributed import init_from_env
    from convscope.models.load import resolve_device
    from convscope.probes.layers import map_layer

    folders = [output / STATE_FOLDER] + ([] if no_relevance else [output / RELEVANCE_STATE_FOLDER])
    timings: dict[str, float] = {}
    with init_from_env(resolve_device(device)) as world:
        claim_state_folders(world, folders, resume=resume)
        try:
            if world.backend == "nccl":
                device = f"cuda:{world.local_rank}"
            loaded = open_model(model, weights, seed, device, output_index=output_index)
            source = open_source(data, loaded.preprocess)
            from convscope.distributed import shard_range

            shard = shard_range(len(source), world.rank, world.size)
            common: dict[str, Any] = {"top": top, "channels": chosen, "batch_size": batch_size, "workers": workers,
                                      "checkpoint_every": checkpoint_every, "resume": resume}
            started = time.perf_counter()
            with (progress_bar(len(shard), "mining", unit="img") if world.is_rank0 else nullcontext(None)) as bar:
                index = top_patches(loaded, source, layer, progress=bar, checkpoint=folders[0], statistics=True,
                                    **common)
            timings["mining_seconds"] = time.perf_counter() - started
            if index.images == 0:  # on every rank (the index is merged): nothing to optimise or draw
                if world.is_rank0:
                    for image, reason in index.skipped[:MAX_LISTED]:
                        typer.echo(f"error: {image}: {reason}", err=True)
                raise DataError(data, f"none of the {len(index.skipped)} images could be read")
            relevance_index = None
            if not no_relevance:
                started = time.perf_counter()
                with (progress_bar(len(shard), "relevance", unit="img") if world.is_rank0
                      else nullcontext(None)) as bar:
                    relevance_index = top_patches(
                        loaded, source, layer, progress=bar, checkpoint=folders[1], rank="relevance",
                        target="predicted", composite=composite, **common)
                timings["relevance_seconds"] = time.perf_counter() - started

            units = [(name, list(index.channels[name])) for name in index.layers]
            chunk = featurevis_batch
            if world.is_rank0:  # the marker lists the chunk files too, so a finished run removes them
                claim_state_folder(folders[0], processes=world.size, resume=True,
                                   files=state_names([ids for _, ids in units], chunk))
            world.barrier()
            jobs = sum(2 * math.ceil(len(ids) / chunk) for _, ids in units)
            mine = len(range(world.rank, jobs, world.size))
            started = time.perf_counter()
            with (progress_bar(mine * featurevis_steps, "feature visualisation", unit="step") if world.is_rank0
                  else nullcontext(None)) as bar:
                visuals = feature_visualizations(loaded, units, world=world, state=folders[0], resume=resume,
                                                 chunk=chunk, settings=settings, progress=bar)
            timings["featurevis_seconds"] = time.perf_counter() - started
        except BaseException:
            if world.is_rank0:
                for folder in folders:
                    release_state_folder(folder, only_if_unused=True)
            raise
    if not world.is_rank0 or visuals is None:
        return
    if relevance_index is not None and relevance_index.uncovered:
        typer.echo(f"warning: no LRP rule covers {listed(relevance_index.uncovered)}: the relevance ranking passes "
                   "them as a plain gradient", err=True)
    started = time.perf_counter()
    out = OutputDir(output)
    shape = loaded.preprocess.input_size
    paths = {name: map_layer(loaded, name, shape).path for name in index.layers}
    document = _draw(out, loaded, source, index, relevance_index, visuals, batch_size=batch_size)
    document = {
        "format": "convscope-atlas",
        "version": 1,
        "model": loaded.name,
        "weights": loaded.weights,
        "data": data,
        "images": index.images,
        "skipped": [{"path": str(image), "error": reason} for image, reason in index.skipped],
        "input_size": list(index.input_size),
        "classes": document["classes"],
        "featurevis": {**settings, "size": featurevis_size if featurevis_size is not None else index.input_size[0]},
        "relevance": None if relevance_index is None else {
            "target": "predicted", "composite": relevance_index.composite},
        "site": "index.html",
        "layers": [
            {"name": name, "path": paths[name], "channels": index.counts.get(name, len(index.channels[name])),
             "boxes_exact": index.boxes_exact[name], "page": f"layers/{safe_name(name)}.html",
             "units": document["units"][name]}
            for name in index.layers
        ],
    }
    from convscope.render.atlas_site import iter_atlas_site

    # A page at a time: a 512-unit layer's unit pages embed ~0.7 GB of pictures together.
    for relative, text in iter_atlas_site(document, lambda relative: (out.root / relative).read_bytes()):
        out.text(relative, text)
    out.json("atlas.json", document)
    timings["drawing_seconds"] = time.perf_counter() - started
    out.manifest("atlas", {
        "data": data, "model": loaded.name, "weights": loaded.weights, "layers": list(layer), "channels": channels,
        "top": top, "featurevis": document["featurevis"], "featurevis_batch": featurevis_batch,
        "relevance": document["relevance"], "batch_size": batch_size, "workers": workers, "processes": world.size,
        "images": index.images, "skipped": len(index.skipped),
        "timings": {key: round(value, 3) for key, value in timings.items()},
    })
    for folder in folders:
        left = release_state_folder(folder)
        if left:
            typer.echo(f"warning: {folder}: holds files convscope did not write ({listed(left)}); "
                       "left as it is", err=True)
    unit_count = sum(len(ids) for ids in index.channels.values())
    parts = ", ".join(f"{key.removesuffix('_seconds')} {value:.1f} s" for key, value in timings.items())
    typer.echo(f"atlas of {unit_count} units over {index.images} images ({parts}); wrote {len(out.written)} files "
               f"to {out.root}; open {out.root / 'index.html'}")
    if index.skipped:
        from convscope.cli.errors import EXIT_USER_ERROR

        typer.echo(f"skipped {len(index.skipped)} unreadable images (listed in atlas.json)", err=True)
        raise typer.Exit(EXIT_USER_ERROR)


def _draw(out: OutputDir, loaded: Any, source: Any, index: Any, relevance_index: Any,
          visuals: dict[tuple[str, str], dict[str, Any]], *, batch_size: int) -> dict[str, Any]:
    """Write every unit's pictures; return ``{"classes": kind, "units": {layer: [unit records]}}``."""
    from convscope.dataset.atlas import class_counts, predicted_classes
    from convscope.dataset.patches import collect_patches
    from convscope.render.colormaps import to_rgb_uint8
    from convscope.render.patches import patch_pictures

    def put(name: str, picture: Any) -> str:
        return out.png(name, picture, defer=True).relative_to(out.root).as_posix()

    winners = sorted({entry.index for lists in index.layers.values() for entries in lists for entry in entries})
    labels = source.labels()
    if labels is not None:
        classes, kind = {p: labels[p] for p in winners}, "dataset"
    else:
        classes, kind = predicted_classes(loaded, source.load, winners, batch_size=min(batch_size, 32)), "predicted"
    categories = list(loaded.categories)

    units: dict[str, list[dict[str, Any]]] = {name: [] for name in index.layers}
    records: dict[tuple[str, int], dict[str, Any]] = {}
    total = sum(len(ids) for ids in index.channels.values()) * (2 if relevance_index is not None else 1)
    with progress_bar(total, "pictures", unit="unit") as advance:
        for name in index.layers:
            folder = safe_name(name)
            stats = index.statistics[name]
            for slot, unit in enumerate(index.channels[name]):
                base = f"{folder}/unit_{unit}"
                record: dict[str, Any] = {
                    "unit": unit,
                    "page": f"units/{folder}/unit_{unit}.html",
                    "featurevis": put(f"{base}/featurevis.png",
                                      to_rgb_uint8(visuals[(name, "featurevis")]["images"][slot])),
                    "negative": put(f"{base}/negative.png",
                                    to_rgb_uint8(visuals[(name, "negative")]["images"][slot])),
                    "objective": _sig(float(visuals[(name, "featurevis")]["final"][slot])),
                    "negative_objective": _sig(float(visuals[(name, "negative")]["final"][slot])),
                    "stats": {
                        "mean": _sig(stats[slot]["mean"]),
                        "max": _sig(stats[slot]["max"]),
                        "firing": _sig(stats[slot]["firing"]),
                        "classes": class_counts([e.index for e in index.layers[name][slot]], classes, categories),
                    },
                    "patches": [],
                    "relevance_patches": [],
                }
                units[name].append(record)
                records[(name, unit)] = record
        for key, which, prefix, map_prefix in (("patches", index, "crop", "projection"),
                                               ("relevance_patches", relevance_index, "relevance_crop",
                                                "relevance_map")):
            if which is None:
                continue
            relevance = which.rank == "relevance"
            for patches in collect_patches(loaded, source, which, batch_size=batch_size):
                record = records[(patches.layer, patches.channel)]
                base = f"{safe_name(patches.layer)}/unit_{patches.channel}"
                for i, entry in enumerate(patches.entries):
                    crop, projection = patch_pictures(patches.crops[i], patches.projections[i] if patches.projections
                                                      else None, relevance=relevance, min_side=MIN_TILE)
                    item: dict[str, Any] = {
                        "image": entry.image if isinstance(entry.image, int) else str(entry.image),
                        "index": entry.index,
                        "value": _sig(entry.value),
                        "cell": list(entry.cell),
                        "box": list(entry.box),
                        "crop": put(f"{base}/{prefix}_{i}.png", crop),
                    }
                    if projection is not None:
                        item["projection"] = put(f"{base}/{map_prefix}_{i}.png", projection)
                    record[key].append(item)
                advance(1)
    out.flush()
    return {"classes": kind, "units": units}
