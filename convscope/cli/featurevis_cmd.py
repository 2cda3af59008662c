"""CLI command ``featurevis``: the image each unit of a layer likes best, grown by optimisation
(Olah et al. 2017, Lucid's recipe), all units in one batched run.

Writes ``featurevis.png`` (every unit in one captioned grid), ``unit_<k>.png`` per unit
(``unit_<k>_<j>.png`` for the diversity objective's images), ``featurevis.json`` (the settings and
each image's final objective) and ``manifest.json``, last.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from convscope.cli.common import open_model
from convscope.cli.options import SEED_MAX, DeviceOpt, ModelOpt, OutDirOpt, WeightsOpt
from convscope.cli.output import OutputDir, prepare_folder
from convscope.cli.patches_cmd import parse_channels
from convscope.cli.progress import progress_bar


def _seed(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise typer.BadParameter(f"must be between 0 and 2^63-1 ({SEED_MAX}), got {value}")
    return value


def featurevis_command(
    layer: Annotated[str, typer.Option("--layer", "-l", help="Layer alias or module path (see 'convscope layers').")],
    channels: Annotated[
        str, typer.Option("--channels", help="Units to visualise, e.g. 0-31 or 3,7,10-12.")
    ],
    output: OutDirOpt = Path("convscope-featurevis"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    seed: Annotated[
        int, typer.Option("--seed", callback=_seed, help="Seed of the starting images and transforms (and of "
                          "--weights random), 0 .. 2^63-1.")
    ] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps.")] = 256,
    objective: Annotated[
        str, typer.Option("--objective", help="channel (mean of the unit's map), neuron (its centre cell), "
                          "negative (minimise the mean) or diversity (several different images per unit).")
    ] = "channel",
    size: Annotated[
        int | None, typer.Option("--size", help="Image side in pixels (default: the model's input size).")
    ] = None,
    parameterization: Annotated[
        str, typer.Option("--parameterization", help="fft (a 1/frequency-scaled spectrum, Lucid's) or pixel.")
    ] = "fft",
    no_decorrelate: Annotated[
        bool, typer.Option("--no-decorrelate", help="Optimise the RGB values directly, without ImageNet's "
                           "colour decorrelation.")
    ] = False,
    transforms: Annotated[
        str, typer.Option("--transforms", help="standard (pad, jitter, scale, rotate, jitter), no-rotation, "
                          "or none.")
    ] = "standard",
    lr: Annotated[float, typer.Option("--lr", help="Adam's learning rate.")] = 0.05,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Units optimised together (default: all at once).")
    ] = None,
    diversity: Annotated[
        int, typer.Option("--diversity", help="With --objective diversity: images per unit.")
    ] = 4,
) -> None:
    """Feature visualisation: for each unit, the image that activates it most, optimised from
    noise with Lucid's recipe (Fourier parameterisation, decorrelated colours, random jitter,
    scale and rotation), all units in one batched optimisation.

    Writes featurevis.png (all units, captioned), unit_K.png per unit (unit_K_J.png with
    --objective diversity), featurevis.json (settings and each unit's final objective) and
    manifest.json, last.

    Examples: convscope featurevis --layer stage4 --channels 0-31 --steps 256 -o out/ |
    convscope featurevis --layer stage6 --channels 7 --objective diversity --diversity 4 -o out/
    """
    # Options first, before the model loads: a bad --channels or -o is one line.
    chosen = parse_channels(channels)
    assert chosen is not None  # --channels is required
    prepare_folder(output)
    from convscope.methods.featurevis import check_options, feature_visualization
    from convscope.render.featurevis import featurevis_figure, unit_picture

    check_options(objective=objective, steps=steps, size=size, parameterization=parameterization,
                  transforms=transforms, lr=lr, seed=seed, batch_size=batch_size, diversity=diversity)
    loaded = open_model(model, weights, seed, device)
    per_unit = diversity if objective == "diversity" else 1
    units_per_chunk = batch_size or len(chosen)
    chunks = -(-len(chosen) // units_per_chunk)
    started = time.perf_counter()
    with progress_bar(steps * chunks, "optimising", unit="step") as advance:
        result = feature_visualization(
            loaded, layer, chosen, objective=objective, steps=steps, size=size,
            parameterization=parameterization, decorrelate=not no_decorrelate, transforms=transforms, lr=lr,
            seed=seed, batch_size=batch_size, progress=advance, diversity=diversity,
        )
    seconds = time.perf_counter() - started

    out = OutputDir(output)
    entries = []
    finals = result.final.tolist()
    for i, unit in enumerate(result.units):
        name = f"unit_{unit}.png" if per_unit == 1 else f"unit_{unit}_{i % per_unit}.png"
        written = out.png(name, unit_picture(result.images, i), defer=True)
        entry: dict[str, object] = {"unit": unit, "final": finals[i],
                                    "file": written.relative_to(out.root).as_posix()}
        if per_unit > 1:
            entry["image"] = i % per_unit
        entries.append(entry)
    out.png("featurevis.png", featurevis_figure(result, model=loaded))
    settings = dict(result.settings)
    document = {
        "model": loaded.name, "weights": loaded.weights, "layer": result.layer, **settings,
        "units": entries,
    }
    out.json("featurevis.json", document)
    out.manifest("featurevis", {
        "model": loaded.name, "weights": loaded.weights, "layer": layer, "channels": channels,
        "objective": objective, "steps": steps, "size": settings["size"], "parameterization": parameterization,
        "decorrelate": not no_decorrelate, "transforms": transforms, "lr": lr, "seed": seed,
        "batch_size": batch_size, "diversity": settings["diversity"],
        "timings": {"optimisation_seconds": round(seconds, 3)},
    })
    typer.echo(f"optimised {len(result.units)} image{'s' if len(result.units) != 1 else ''} of {result.layer} "
               f"for {steps} steps in {seconds:.1f} s; wrote {len(out.written)} files to {out.root}")
