"""``convscope models``, ``layers``, ``summary`` and ``demo``: the commands that describe a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from convscope.cli.common import bundled_photo, open_model
from convscope.cli.options import DeviceOpt, JsonOpt, ModelOpt, OutDirOpt, OutputIndexOpt, SeedOpt, WeightsOpt
from convscope.cli.output import OutputDir, safe_name
from convscope.errors import BadArgument


def models_command(
    pattern: Annotated[
        str | None,
        typer.Argument(help="Show only names matching this glob (resnet*) or substring (resnet).", show_default=False),
    ] = None,
    all_models: Annotated[
        bool, typer.Option("--all", help="Also list every torchvision:NAME and timm:NAME (timm's when installed).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the built-in architectures; with --all, also the torchvision and timm models --model takes.

    --model also takes FILE.py:FUNCTION or package.module:FUNCTION (a factory returning an
    nn.Module; this runs that code) and a torch.export archive FILE.pt2.

    Examples: convscope models | convscope models --all resnet | convscope models --all 'timm:vit_*'
    """
    from convscope.models.external import matches, timm_names, torchvision_names
    from convscope.models.registry import get_spec, list_models

    rows: list[dict[str, Any]] = []
    for name in list_models():
        if not matches(name, pattern):
            continue
        spec = get_spec(name)
        rows.append({
            "name": name,
            "source": "built-in",
            "pretrained": spec.pretrained is not None,
            "input_size": list(spec.preprocess.input_size),
            "description": spec.description,
        })
    missing_timm = False
    if all_models:
        external = [("torchvision", torchvision_names())]
        found_timm = timm_names()
        if found_timm is None:
            missing_timm = True
        else:
            external.append(("timm", found_timm))
        for source, names in external:
            for short in names:
                name = f"{source}:{short}"
                if matches(name, pattern):
                    rows.append({"name": name, "source": source})
    if missing_timm:
        typer.echo("note: timm is not installed: pip install convscope[timm] to list and use timm:NAME", err=True)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        raise BadArgument(f"models {pattern}", "no model name matches",
                          None if all_models else "add --all to search torchvision and timm too")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if r["source"] == "built-in":
            flag = "pretrained" if r["pretrained"] else "          "
            typer.echo(f"{r['name'].ljust(width)}  {flag}  {r['description']}")
        else:
            typer.echo(r["name"])


def _listing_weights(model: str | None, weights: str | None) -> str | None:
    """``layers`` and ``summary`` need no trained weights: random unless the model holds its own
    (a factory, a .pt2 archive) or a file was given."""
    if weights is not None:
        return weights
    from convscope.models.external import parse_model_spec

    return None if model is not None and parse_model_spec(model).runs_code else "random"


def layers_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the layer names you can pass to --layer, with aliases and output shapes.

    Example: convscope layers --model alexnet --weights random
    """
    from convscope.probes.layers import list_layers
    from convscope.render.text import layers_table

    loaded = open_model(model, _listing_weights(model, weights), seed, device, output_index=output_index)
    rows = list_layers(loaded)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(layers_table(rows))


def summary_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    input_size: Annotated[
        str | None, typer.Option("--input-size", help="C,H,W (default: the model's preset).")
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option("--max-memory", min=0.001, help="GiB of activations the traced image may take (default: 4)."),
    ] = None,
    output_index: OutputIndexOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer output shapes, parameters, kernel/stride/padding, receptive fields and cost.

    Examples: convscope summary --model alexnet | convscope summary --model zfnet --input-size 3,227,227 --json
    """
    from convscope.methods.summary import DEFAULT_MAX_ACTIVATION_BYTES, summary
    from convscope.render.text import summary_table

    size = None
    if input_size:
        try:
            size = tuple(int(v) for v in input_size.replace("x", ",").split(","))
        except ValueError:
            raise BadArgument("--input-size", f"expected C,H,W integers, got {input_size!r}") from None
        if len(size) != 3:
            raise BadArgument("--input-size", f"expected three values C,H,W, got {input_size!r}")
    loaded = open_model(model, _listing_weights(model, weights), seed, device, output_index=output_index)
    limit = DEFAULT_MAX_ACTIVATION_BYTES if max_memory is None else int(max_memory * 2**30)
    result = summary(loaded, input_size=size, max_activation_bytes=limit)
    if json_out:
        typer.echo(json.dumps(summary_json(result), indent=2))
    else:
        typer.echo(summary_table(result))


def summary_json(result: Any) -> dict[str, Any]:
    from dataclasses import asdict

    layers = []
    for layer in result.layers:
        row = asdict(layer)
        kind = layer.receptive_field_kind
        row["receptive_field"] = (
            ({"kind": kind} if kind == "global" else None) if layer.receptive_field is None
            else {"size": layer.receptive_field, "jump": layer.jump, "start": layer.start, "exact": layer.rf_exact,
                  "kind": kind}
        )
        for key in ("jump", "start", "rf_exact", "receptive_field_kind"):
            row.pop(key)
        layers.append(row)
    return {
        "model": result.model,
        "input_size": list(result.input_size),
        "layers": layers,
        "total_params": result.total_params,
        "trainable_params": result.trainable_params,
        "total_mult_adds": result.total_mult_adds,
        "param_megabytes": result.param_bytes / 2**20,
        "activation_megabytes": result.activation_bytes / 2**20,
        "notes": list(result.notes),
    }


def demo_command(
    output: OutDirOpt = Path("demo-out"),
    image: Annotated[Path | None, typer.Option("--image", help="Photo (default: the bundled cat).")] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
) -> None:
    """The main job on the default model and a bundled photo: classification, summary,
    activation maps, a feature grid and the first-layer filters, in one folder.

    Example: convscope demo -o demo-out
    """
    from convscope.methods.activations import activation_maps, feature_maps
    from convscope.methods.filters import conv_filters
    from convscope.methods.predict import classify
    from convscope.methods.summary import summary
    from convscope.render.pictures import (
        activation_figure,
        activation_strip,
        display_image,
        feature_figure,
        filter_figure,
    )
    from convscope.render.text import predictions_table, summary_table

    photo_path = image or bundled_photo()
    out = OutputDir(output, inputs=[photo_path])
    loaded = open_model(model, weights, 0, device, output_index=output_index)
    batch = loaded.preprocess.to_tensor(loaded.preprocess.load_image(photo_path)).to(loaded.device)

    prediction = classify(loaded, batch, topk=5)[0]
    out.json("classification.json", [{"image": str(photo_path), "predictions": prediction.as_dicts()}])
    table = predictions_table(str(photo_path), prediction)
    out.text("classification.txt", table + "\n")

    model_summary = summary(loaded)
    out.text("summary.txt", summary_table(model_summary) + "\n")
    out.json("summary.json", summary_json(model_summary))

    result = activation_maps(loaded, batch)
    photo = display_image(loaded.preprocess, batch)
    out.png("input.png", photo)
    for layer in result.layers:
        out.png(f"activation_{safe_name(layer)}.png", activation_figure(photo, result, layer, model=loaded))
    strip_path = out.png("activations.png", activation_strip(photo, result, model=loaded))

    stages = list(loaded.stages)
    grid_layer = stages[len(stages) // 3] if stages else loaded.cam_layer
    grid = feature_maps(loaded, batch, layer=grid_layer, max_channels=32, order="activation")
    out.png(f"features_{safe_name(grid_layer)}.png", feature_figure(grid, model=loaded, order="activation"))
    filters = conv_filters(loaded)
    out.png("filters.png", filter_figure(filters, model=loaded))
    out.manifest("demo", {"model": loaded.name, "weights": loaded.weights, "image": str(photo_path)})

    typer.echo(table)
    typer.echo(f"\nwrote {len(out.written)} files to {out.root.resolve()}")
    typer.echo(f"  open {strip_path} for the activation maps of every stage")
