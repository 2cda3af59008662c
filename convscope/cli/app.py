"""The ``convscope`` command line: one thin command per job.

Each command parses options, calls library functions, renders and writes through
``OutputDir``. User errors become ``error: <subject>: <reason>`` with exit code 2. The method
commands (classify, activations, ..., occlusion) are generated from the method registry by
``convscope.cli.methods_cmd``; the others are written here and in the ``*_cmd`` modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convscope.cli.errors import GuardedGroup, print_error
from convscope.cli.options import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    OutDirOpt,
    SeedOpt,
    WeightsOpt,
)
from convscope.cli.output import OutputDir, safe_name
from convscope.errors import BadArgument, ImageError

if TYPE_CHECKING:
    from convscope.types import LoadedModel

app = typer.Typer(
    cls=GuardedGroup,
    help="convscope: see what a convolutional network sees.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def open_model(model: str | None, weights: str | None, seed: int, device: str, precision: str = "float32") -> LoadedModel:
    """``load_model``; a ``precision`` other than float32 stays in force until the command ends."""
    from convscope.models.load import load_model
    from convscope.runtime import inference_precision, resolve_precision

    resolve_precision(precision)  # a bad --precision fails before the model loads
    loaded = load_model(model, weights, seed=seed, device=device)
    context = _current_context()
    if precision != "float32" and context is not None:
        choice = context.with_resource(inference_precision(precision, loaded.device))
        if choice.note:
            typer.echo(f"note: {choice.note}", err=True)
    return loaded


def _current_context() -> Any:
    """The running command's click context, or None.

    typer 0.29 carries its own copy of click (``typer._click``): ``click.get_current_context`` there
    sees no command at all, so the precision note and its reset were silently skipped.
    """
    import importlib

    try:
        globals_module = importlib.import_module("typer._click.globals")
    except ImportError:  # typer releases that run on the click package
        globals_module = importlib.import_module("click.globals")
    return globals_module.get_current_context(silent=True)


@app.callback()
def startup(
    no_tune: Annotated[
        bool,
        typer.Option("--no-tune", envvar="CONVSCOPE_NO_TUNE",
                     help="Leave the C memory allocator untuned (see convscope.tune_cpu)."),
    ] = False,
) -> None:
    # Large CPU batches run about twice as fast with glibc's allocator tuned; results are
    # identical. The library never does this on import, so the CLI does it here.
    if not no_tune:
        from convscope.cli.errors import debug
        from convscope.runtime import tune_cpu

        report = tune_cpu()
        if debug():
            typer.echo(f"convscope: {report.note} ({report.libc})", err=True)


def bundled_photo() -> Path:
    """The demo photo shipped with the package (scikit-image's Chelsea, CC0)."""
    return Path(str(resources.files("convscope").joinpath("data/chelsea.jpg")))


def expand_images(paths: list[Path]) -> list[Path]:
    from convscope.imageio import iter_images

    found = iter_images(paths)
    if not found:
        raise ImageError(", ".join(str(p) for p in paths), "no image files found")
    return found


def load_good_images(paths: list[Path], preprocess: Any = None) -> Iterator[tuple[Path, Any]]:
    """Yield ``(path, image)`` for readable images; report the others on stderr and skip them.

    With ``preprocess``, big photos decode at reduced size for that model (``Preprocess.load_image``)."""
    from convscope.imageio import load_image

    decode = preprocess.load_image if preprocess is not None else load_image
    for path in paths:
        try:
            yield path, decode(path)
        except ImageError as exc:
            print_error(exc)


def split_layers(layers: list[str] | None) -> list[str] | None:
    if not layers:
        return None
    return [name.strip() for item in layers for name in item.split(",") if name.strip()]


@app.command("models")
def models_command(json_out: JsonOpt = False) -> None:
    """List the built-in architectures.

    Example: convscope models
    """
    from convscope.models.registry import get_spec, list_models

    rows: list[dict[str, Any]] = []
    for name in list_models():
        spec = get_spec(name)
        rows.append({
            "name": name,
            "pretrained": spec.pretrained is not None,
            "input_size": list(spec.preprocess.input_size),
            "description": spec.description,
        })
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        flag = "pretrained" if r["pretrained"] else "          "
        typer.echo(f"{r['name'].ljust(width)}  {flag}  {r['description']}")


@app.command("layers")
def layers_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """List the layer names you can pass to --layer, with aliases and output shapes.

    Example: convscope layers --model alexnet --weights random
    """
    from convscope.probes.layers import list_layers
    from convscope.render.text import layers_table

    loaded = open_model(model, weights or "random", seed, device)
    rows = list_layers(loaded)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(layers_table(rows))


@app.command("summary")
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
    loaded = open_model(model, weights or "random", seed, device)
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
        row["receptive_field"] = (
            None if layer.receptive_field is None
            else {"size": layer.receptive_field, "jump": layer.jump, "start": layer.start, "exact": layer.rf_exact}
        )
        for key in ("jump", "start", "rf_exact"):
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


def layer_records(loaded: LoadedModel, names: list[str] | None) -> list[dict[str, str]] | None:
    """``[{"layer": alias or path as named, "module": module path}]`` for JSON and manifests."""
    return None if names is None else [layer_record(loaded, name) for name in names]


def layer_record(loaded: LoadedModel, name: str) -> dict[str, str]:
    """A layer as every JSON of a run records it: the friendly name and its module path."""
    from convscope.probes.layers import alias_of

    path = loaded.stages.get(name, name)
    return {"layer": alias_of(loaded, path), "module": path}


@app.command("demo")
def demo_command(
    output: OutDirOpt = Path("demo-out"),
    image: Annotated[Path | None, typer.Option("--image", help="Photo (default: the bundled cat).")] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
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
    loaded = open_model(model, weights, 0, device)
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




def reflow_help(doc: str) -> str:
    """A docstring as help text that reads well at any width: each paragraph one line (the help
    formatter keeps single line breaks, which broke sentences mid-way in an 80-column pipe), and
    each example on a line of its own."""
    paragraphs = []
    for block in doc.strip().split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if lines and lines[0].startswith(("Example:", "Examples:")):
            head, _, first = lines[0].partition(":")
            entries: list[str] = []
            joined = False
            for line in [first.strip(), *lines[1:]]:
                if joined or (entries and (line.startswith(("(", "--")) or entries[-1].endswith(" |"))):
                    entries[-1] = entries[-1].rstrip("\\ ") + " " + line
                elif line:
                    entries.append(line)
                joined = line.endswith("\\")
            examples = [e.strip() for entry in entries for e in entry.split(" | ") if e.strip(" |")]
            # "\b" keeps click's plain formatter (piped help) from re-wrapping the examples into one line.
            paragraphs.append("\b\n" + "\n".join([f"{head}:", *("  " + e.rstrip(" |") for e in examples)]))
        else:
            paragraphs.append(" ".join(lines))
    return "\n\n".join(paragraphs)


# Command modules register themselves on `app` when imported; the method commands are built from
# the method registry (after reflow_help, which they use).
from convscope.cli import analysis_cmd as _analysis  # noqa: F401
from convscope.cli import explain as _explain  # noqa: F401
from convscope.cli import methods_cmd as _methods
from convscope.cli import patches_cmd as _patches  # noqa: F401
from convscope.cli import train_cmd as _train  # noqa: F401
from convscope.cli import web_cmd as _web  # noqa: F401

_methods.register_method_commands(app)


def _reflow_command_help() -> None:
    import inspect

    for info in app.registered_commands:
        if getattr(info.callback, "generated", False):
            continue  # built with reflowed help
        doc = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if doc:
            info.help = reflow_help(doc)


_reflow_command_help()


def main() -> None:
    """Console-script entry point."""
    import sys

    import typer.core

    if not sys.stdout.isatty():
        # Piped help (`convscope train --help | less`, 80 columns) in click's plain layout: rich's
        # boxed table truncates long option names and squeezes their help into a narrow column.
        typer.core.HAS_RICH = False
    app()


if __name__ == "__main__":
    main()
