"""CLI command ``occlusion``: Zeiler & Fergus occlusion sensitivity as pictures.

For each image: the target-class probability with the grey square at each position over the
photo, the per-pixel probability drop, the most probable class at each position (colours with
a legend), and, with ``--layer``, the total activation of one feature map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from convscope.cli.app import app, expand_images, layer_record, load_good_images, open_model
from convscope.cli.errors import EXIT_USER_ERROR
from convscope.cli.options import (
    ClassOpt,
    DeviceOpt,
    ImagesArg,
    JsonOpt,
    LabelOpt,
    LayerOpt,
    ModelOpt,
    OutDirOpt,
    RawOpt,
    SeedOpt,
    WeightsOpt,
    class_target,
    plural,
)
from convscope.cli.output import OutputDir
from convscope.cli.progress import progress_bar


def _normalised(values: Any) -> Any:
    import numpy as np

    array = np.asarray(values, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return np.zeros_like(array) if high <= low else (array - low) / (high - low)


def _check_fill(fill: str) -> None:
    """--fill nan/inf would run the whole occlusion and write NaN probabilities: refuse up front."""
    import math

    from convscope.errors import BadArgument
    from convscope.methods.occlusion import FILL_COLOURS

    if fill.strip().lower() in FILL_COLOURS:
        return
    try:
        value = float(fill)
    except ValueError:
        raise BadArgument(f"--fill {fill}", "is not grey, black, white or a number") from None
    if not math.isfinite(value):
        raise BadArgument(f"--fill {fill}", "must be grey, black, white or a finite number")


@app.command("occlusion")
def occlusion_command(
    images: ImagesArg,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_index: ClassOpt = None,
    label: LabelOpt = None,
    window: Annotated[int, typer.Option("--window", help="Side of the occluding square, in input pixels.")] = 16,
    stride: Annotated[int, typer.Option("--stride", help="Step between square positions, in input pixels.")] = 8,
    fill: Annotated[
        str,
        typer.Option(
            "--fill",
            help="The square: grey, black or white (pixel colours, normalised like the photo), or a "
            "number in the model's normalised input space (0 = the dataset's mean colour).",
        ),
    ] = "grey",
    layer: LayerOpt = None,
    channel: Annotated[
        int | None, typer.Option("--channel", help="Feature map of --layer (default: the strongest on the photo).")
    ] = None,
    cover_border: Annotated[
        bool, typer.Option("--cover-border", help="Add clipped squares at the far borders (captum's grid).")
    ] = False,
    mode: Annotated[
        str, typer.Option(
            "--mode",
            help="exact (incremental where possible), approximate (the same in bfloat16 where the hardware is fast "
            "at it: faster, probabilities off by up to ~0.03) or full (every copy through the whole network).",
        )
    ] = "exact",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Occluded copies per forward pass.")] = 64,
    json_out: JsonOpt = False,
    raw: RawOpt = False,
) -> None:
    """Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): slide a grey square over the photo.

    Writes <image>_occlusion_probability.png (target probability with the square at each
    position, over the photo: blue = hiding that spot hurts), <image>_occlusion_drop.png
    (per-pixel probability drop, captum's Occlusion map), <image>_occlusion_classes.png (the most
    probable class at each position, with a legend), and with --layer
    <image>_occlusion_activation.png (total activation of one feature map at each position).

    Examples: convscope occlusion cat.jpg -o out/ | convscope occlusion cat.jpg --label tabby --window 32 --stride 16 |
    convscope occlusion cat.jpg -m alexnet -w random --layer conv5 --fill black
    """
    from convscope.methods.occlusion import grid_origins, occlusion
    from convscope.render.classmap import class_map_picture, grid_to_image
    from convscope.render.colormaps import colorize
    from convscope.render.grids import upscale
    from convscope.render.overlay import overlay
    from convscope.render.pictures import display_image, occlusion_figures

    _check_fill(fill)
    target = class_target(class_index, label)
    paths = expand_images(images)
    out = OutputDir(output, inputs=paths)
    loaded = open_model(model, weights, seed, device)
    records: list[dict[str, Any]] = []
    warned: set[str] = set()
    failures = len(paths)
    for path, image in load_good_images(paths, loaded.preprocess):
        failures -= 1
        batch = loaded.preprocess.to_tensor([image]).to(loaded.device)
        height, width = batch.shape[-2:]
        total = None
        if 1 <= window <= min(height, width) and stride >= 1:
            total = len(grid_origins(height, window, stride, cover_border)) * len(grid_origins(width, window, stride, cover_border))
        with progress_bar(total, f"occlusion {path.name}", unit="copy") as advance:
            result = occlusion(
                loaded, batch, target, window=window, stride=stride, fill=fill, layer=layer,
                channel=channel, batch_size=batch_size, mode=mode, cover_border=cover_border, progress=advance,
            )
        if result.stats.fallback and result.stats.fallback not in warned:
            warned.add(result.stats.fallback)
            typer.echo(f"warning: --mode approximate: {result.stats.fallback}", err=True)
        photo = display_image(loaded.preprocess, batch, 0)
        origins = (result.row_origins, result.col_origins)
        stem = out.stem(path)
        probability = grid_to_image(result.probability[0], origins, window, (height, width))
        activation = None
        if result.activation is not None and result.channels is not None:
            activation = grid_to_image(result.activation[0], origins, window, (height, width))
        if raw:
            pictures = {
                "probability": overlay(photo, _normalised(probability)),
                "drop": overlay(photo, _normalised(result.pixel_drop[0].clamp_min(0))),
                "classes": class_map_picture(result.top_class[0], result.class_names, origins, window,
                                             (height, width), photo=photo, highlight=int(result.targets[0])),
            }
            if activation is not None:
                pictures["activation"] = overlay(photo, _normalised(activation))
        else:
            pictures = occlusion_figures(photo, result, 0, loaded)
        files = [out.png(f"{stem}_occlusion_{key}.png", pictures[key], source=path)
                 for key in ("probability", "drop", "classes")]
        record: dict[str, Any] = {
            "image": str(path),
            "class": int(result.targets[0]),
            "label": result.labels[0],
            "clean_probability": float(result.clean_probability[0]),
            "lowest_probability": float(result.probability[0].min()),
            "grid": [len(result.row_origins), len(result.col_origins)],
            "window": window,
            "stride": stride,
            "fill": list(result.fill),
            "classes_shown": {result.class_names[c]: int((result.top_class[0] == c).sum())
                              for c in sorted(set(result.top_class[0].flatten().tolist()))},
            "mode": result.stats.mode,
            "work_fraction": round(result.stats.work_fraction, 4),
            "precision": result.stats.precision,
            "fallback": result.stats.fallback or None,
        }
        if activation is not None and result.activation is not None and result.channels is not None:
            files.append(out.png(f"{stem}_occlusion_activation.png", pictures["activation"], source=path))
            files.append(out.png(f"{stem}_occlusion_activation_map.png",
                                 upscale(colorize(_normalised(result.activation[0].numpy())), 224), source=path))
            record.update({
                **layer_record(loaded, layer or ""),
                "channel": int(result.channels[0]),
                "clean_activation": float(result.clean_activation[0]) if result.clean_activation is not None else None,
            })
        record["files"] = [f.name for f in files]
        records.append(record)
    out.json("occlusion.json", records)
    out.manifest("occlusion", {
        "model": loaded.name, "weights": loaded.weights, "class": class_index, "label": label,
        "window": window, "stride": stride, "fill": fill, **(layer_record(loaded, layer) if layer else {"layer": None}),
        "channel": channel,
        "cover_border": cover_border, "mode": mode, "batch_size": batch_size,
    })
    if json_out:
        typer.echo(json.dumps(records, indent=2))
    else:
        typer.echo(f"wrote {plural(len(out.written), 'file')} to {out.root}")
    if failures:
        raise typer.Exit(EXIT_USER_ERROR)
