"""CLI command ``patches``: the top activations of every channel over a dataset (Zeiler & Fergus Fig. 2),
or with ``--rank relevance`` the images where each channel mattered most for a class (CRP).

Mines the data once (resumable, shardable with torchrun), then loads the winners again to draw
each channel's crops beside their deconvnet projections (conditional relevance maps for a
relevance ranking), and writes ``patches.json``,
``LAYER/channel_K.png``, ``index.html`` and ``manifest.json`` (last). Under torchrun only rank 0
projects and writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from convscope.cli.common import open_model
from convscope.cli.errors import EXIT_USER_ERROR
from convscope.cli.options import DeviceOpt, ModelOpt, OutDirOpt, OutputIndexOpt, SeedOpt, WeightsOpt
from convscope.cli.output import OutputDir, prepare_folder, safe_name
from convscope.cli.progress import progress_bar
from convscope.errors import BadArgument, DataError, OutputError
from convscope.methods.registry import cli_choices
from convscope.parsing import parse_class_index, parse_int, shown

STATE_FOLDER = ".patches-state"
MAX_LISTED = 10
# Channel ids above this are refused before any list is built; each layer's own count is checked
# once the model is loaded. No feature map comes near it.
MAX_CHANNELS = 1 << 16
_CHANNELS_FORM = "expected ids and ranges like 0-63 or 3,7,10-12"
COMPOSITES = cli_choices("lrp", "--composite")


def listed(items: Sequence[object]) -> str:
    """The first ``MAX_LISTED`` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(str(item) for item in items[:MAX_LISTED]) + more


def claim_state_folders(world: Any, folders: Sequence[Path], *, resume: bool) -> None:
    """Rank 0 alone claims the state folders (marks them, or refuses a user's folder of such a name)
    and tells the others, so every rank stops with the same line before any work.

    Raises:
        OutputError: on every rank, when a folder is not convscope's.
    """
    from convscope.dataset.state import claim_state_folder

    refusal = None
    if world.is_rank0:
        try:
            for folder in folders:
                claim_state_folder(folder, processes=world.size, resume=resume)
        except OutputError as exc:
            refusal = (exc.subject, exc.reason, exc.hint)
    refusal = world.all_gather_object(refusal)[0]
    if refusal is not None:
        raise OutputError(*refusal)


def parse_target(text: str | None) -> int | str | None:
    """``--target``: a class index (ASCII digits), or a word (a class name, or ``predicted``, which
    the library reads as each image's top-1 class); ``None`` when absent."""
    return None if text is None else parse_class_index(text, subject="--target")


def parse_channels(spec: str | None) -> list[int] | None:
    """``"0-63"``, ``"3,7,10-12"`` -> sorted unique ids; ``None`` -> all channels.

    Every number is parsed (ASCII digits only) and bounded by ``MAX_CHANNELS`` before any range
    is expanded, so ``0-99999999999`` is one error, at once.

    Raises:
        BadArgument: ``--channels SPEC: <reason>``.
    """
    if spec is None:
        return None
    subject = f"--channels {shown(spec)}"

    def channel(text: str) -> int:
        if not text.strip():
            raise BadArgument(subject, "a range needs a first and a last id", _CHANNELS_FORM)
        try:
            return parse_int(text, subject="channel", minimum=0, maximum=MAX_CHANNELS - 1)
        except BadArgument as exc:
            hint = _CHANNELS_FORM if "whole number" in exc.reason else None
            raise BadArgument(subject, f"{exc.subject} {exc.reason}", hint) from None

    spans: list[tuple[int, int]] = []
    for part in spec.split(","):
        item = part.strip()
        if not item:
            continue
        first, dash, last = item.partition("-")
        low = channel(first)
        high = channel(last) if dash else low
        if high < low:
            raise BadArgument(subject, f"range {item} runs backwards")
        spans.append((low, high))
    if not spans:
        raise BadArgument(subject, "names no channels", _CHANNELS_FORM)
    ids: set[int] = set()
    for low, high in spans:  # each at most MAX_CHANNELS long: checked above
        ids.update(range(low, high + 1))
    return sorted(ids)


def patches_command(
    data: Annotated[
        str,
        typer.Argument(
            help="Image folder (searched recursively), text file with one image path per line, "
            "or fashion-mnist[:train|:test].",
            show_default=False,
        ),
    ],
    layer: Annotated[
        list[str],
        typer.Option("--layer", "-l", help="Layer alias or module path; repeat for several (one pass mines all)."),
    ],
    output: OutDirOpt = Path("convscope-patches"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Patches per channel.")] = 9,
    channels: Annotated[
        str | None, typer.Option("--channels", help="Channels to mine, e.g. 0-63 or 3,7,10-12 (default: all).")
    ] = None,
    no_projections: Annotated[
        bool, typer.Option("--no-projections", help="Crops only: skip the projections (deconvnet, or relevance maps).")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Processes decoding image files (0: in the main process).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint in the output folder.")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Batches between checkpoints of the running state.")
    ] = 50,
    rank: Annotated[
        str, typer.Option("--rank", help="activation: how strongly each channel fires; relevance: how much it "
                          "contributed to the --target class (CRP, with LRP).")
    ] = "activation",
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="With --rank relevance (required): the class, an index or "
                                 "a name, or 'predicted' (each image's top-1 class).")
    ] = None,
    composite: Annotated[
        str | None, typer.Option("--composite", help="With --rank relevance: the LRP rules, "
                                 f"{', '.join(COMPOSITES)} (default {COMPOSITES[0]}).")
    ] = None,
) -> None:
    """Top-9 dataset patches of every channel: crops under the receptive field beside their
    deconvnet projections (Zeiler & Fergus 2014, Fig. 2).

    Writes patches.json (the index), LAYER/channel_K.png per channel, index.html (a gallery that
    reads offline) and manifest.json, last. The running state is checkpointed in
    OUTPUT/.patches-state (a folder of that name that convscope did not make is refused, never
    touched); after an interruption run the same command with --resume, which refuses other
    settings, weights or images. Under
    torchrun --nproc-per-node N -m convscope patches ... each rank mines a shard and rank 0 writes.

    With --rank relevance --target CLASS|predicted the images are ranked by each channel's
    conditional relevance for that class (Concept Relevance Propagation: LRP from the class
    score to the layer, summed over the channel's map), the box is the receptive field at the
    channel's most relevant cell, and the right-hand pictures are its conditional relevance maps
    at the input (the channel's relevance alone, carried on to the pixels).

    Examples: convscope patches photos/ --layer stage3 --channels 0-15 -o out/ |
    convscope patches fashion-mnist --model zfnet_mnist --weights runs/fm/best.pt --layer conv1 --layer conv5 -o out/ |
    convscope patches photos/ --layer stage5 --rank relevance --target predicted -o out/
    """
    # Options first, before torch loads: a bad --channels or -o is one line in about a second.
    chosen = parse_channels(channels)
    wanted = parse_target(target)
    if rank != "activation" or wanted is not None or composite is not None:
        from convscope.dataset.patches import check_ranking  # the library's words for rankings (loads torch)

        check_ranking(rank, wanted, composite)
    prepare_folder(output)  # before any work, as every command does: a file or /dev/null is one line

    from convscope.dataset.patches import collect_patches, top_patches
    from convscope.dataset.sources import open_source
    from convscope.dataset.state import release_state_folder
    from convscope.distributed import init_from_env, shard_range
    from convscope.models.load import resolve_device
    from convscope.render.patches import channel_figure, gallery_html

    state_dir = output / STATE_FOLDER
    with init_from_env(resolve_device(device)) as world:
        claim_state_folders(world, [state_dir], resume=resume)
        try:
            if world.backend == "nccl":
                device = f"cuda:{world.local_rank}"
            loaded = open_model(model, weights, seed, device, output_index=output_index)
            source = open_source(data, loaded.preprocess)
            shard = shard_range(len(source), world.rank, world.size)
            started = time.perf_counter()
            bar = progress_bar(len(shard), "mining", unit="img") if world.is_rank0 else nullcontext(None)
            with bar as advance:
                index = top_patches(
                    loaded, source, layer, top=top, channels=chosen, batch_size=batch_size, workers=workers,
                    progress=advance, checkpoint=state_dir, checkpoint_every=checkpoint_every, resume=resume,
                    rank=rank, target=wanted, composite=composite,
                )
            mining_seconds = time.perf_counter() - started
        except BaseException:
            if world.is_rank0:  # a run stopped before its first checkpoint leaves no empty folder
                release_state_folder(state_dir, only_if_unused=True)
            raise
    # The ranks leave the process group together once the tables are merged; rank 0 alone draws,
    # outside it, so the others do not wait on it (nor time out) while it renders.
    if not world.is_rank0:
        return
    if index.uncovered:
        shown_paths = listed(index.uncovered)
        typer.echo(f"warning: no LRP rule covers {shown_paths}: relevance passes them as a plain gradient "
                   "(listed in patches.json)", err=True)
    if index.images == 0:
        for image, reason in index.skipped[:MAX_LISTED]:
            typer.echo(f"error: {image}: {reason}", err=True)
        raise DataError(data, f"none of the {len(index.skipped)} images could be read")

    out = OutputDir(output)
    out.json("patches.json", index.to_json())
    started = time.perf_counter()
    gallery: dict[str, list[dict[str, object]]] = {name: [] for name in index.layers}
    total = sum(len(entries) for lists in index.layers.values() for entries in lists)
    with progress_bar(total, "projections" if not no_projections else "crops", unit="patch") as advance:
        for patches in collect_patches(
            loaded, source, index, projections=not no_projections, batch_size=batch_size, progress=advance
        ):
            link = None
            if patches.entries:
                picture = channel_figure(patches.crops, patches.projections, [e.value for e in patches.entries],
                                         relevance=index.rank == "relevance")
                written = out.png(f"{safe_name(patches.layer)}/channel_{patches.channel}.png", picture, defer=True)
                # The name OutputDir chose (channel_0_2.png beside a user's channel_0.png), not the one asked for.
                link = written.relative_to(out.root).as_posix()
            gallery[patches.layer].append({
                "channel": patches.channel,
                "picture": link,
                "best": patches.entries[0].value if patches.entries else None,
                "count": len(patches.entries),
            })
    drawing_seconds = time.perf_counter() - started
    notes = [
        f"model {index.model} ({loaded.weights}); data {index.source}: {index.images} images"
        + (f", {len(index.skipped)} skipped (listed in patches.json)" if index.skipped else ""),
        _picture_note(index.rank, not no_projections),
    ]
    if index.rank == "relevance":
        notes.insert(1, f"ranked by each channel's relevance for {_target_words(index.target, index.label)} "
                     f"(CRP: LRP with the {index.composite} composite, summed over the channel's map)")
    inexact = [name for name, exact in index.boxes_exact.items() if not exact]
    if inexact:
        notes.append(
            f"receptive fields of {', '.join(inexact)} are approximate (the network leaves a plain conv/pool "
            "chain, e.g. residual additions): the crops follow the main path"
        )
    title = f"Top-{top} patches" + (" by relevance" if index.rank == "relevance" else "")
    out.text("index.html", gallery_html(title, gallery, notes=notes))
    out.manifest("patches", {
        "data": data, "model": loaded.name, "weights": loaded.weights, "layers": list(layer),
        "rank": index.rank, "target": index.target, "composite": index.composite,
        "top": top, "channels": channels, "projections": not no_projections, "batch_size": batch_size,
        "workers": workers, "processes": world.size, "images": index.images, "skipped": len(index.skipped),
        "boxes_exact": index.boxes_exact,
        "timings": {
            "mining_seconds": round(mining_seconds, 3),
            "images_per_second": round(index.images / mining_seconds, 1) if mining_seconds > 0 else None,
            "drawing_seconds": round(drawing_seconds, 3),
        },
    })
    # The run is complete: nothing to resume. Only the files convscope put there go.
    left = release_state_folder(state_dir)
    if left:
        shown = listed(left)
        typer.echo(f"warning: {state_dir}: holds files convscope did not write ({shown}); left as it is", err=True)
    rate = index.images / mining_seconds if mining_seconds > 0 else 0.0
    typer.echo(
        f"mined {index.images} images in {mining_seconds:.1f} s ({rate:.0f} img/s) on {world.size} "
        f"process{'es' if world.size > 1 else ''}; wrote {len(out.written)} files to {out.root}"
    )
    if index.skipped:
        typer.echo(f"skipped {len(index.skipped)} unreadable images:", err=True)
        for image, reason in index.skipped[:MAX_LISTED]:
            typer.echo(f"  {image}: {reason}", err=True)
        if len(index.skipped) > MAX_LISTED:
            typer.echo(f"  ... and {len(index.skipped) - MAX_LISTED} more (see patches.json)", err=True)
        raise typer.Exit(EXIT_USER_ERROR)



def _target_words(target: int | str | None, label: str | None) -> str:
    if target == "predicted":
        return "each image's predicted (top-1) class"
    return f"class {target}" + (f" ({label})" if label else "")


def _picture_note(rank: str, projections: bool) -> str:
    """What the gallery's tiles are."""
    if rank == "relevance":
        where = "the input under the receptive field of the channel's most relevant cell"
        return f"left: {where}; right: the channel's conditional relevance map (signed)" if projections else where
    where = "the input under each activation's receptive field"
    return f"left: {where}; right: its deconvnet projection" if projections else where
