"""Reusable typed options (Annotated aliases) shared by all commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convscope.models.registry import DEFAULT_MODEL


def _model_names() -> list[str]:
    from convscope.models.registry import list_models

    return list_models()


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help=f"Architecture (default: {DEFAULT_MODEL}, or the one recorded in a --weights checkpoint). "
        "See 'convscope models'.",
        autocompletion=_model_names,
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w",
        help="'pretrained', 'random', or a .pth/.safetensors/convscope checkpoint file "
        "(default: pretrained when the model has published weights, else random).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --weights random.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")]
OutDirOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder for the pictures (created).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
LayerOpt = Annotated[
    str | None, typer.Option("--layer", "-l", help="Layer alias or module path (see 'convscope layers').")
]
LayersOpt = Annotated[
    list[str] | None,
    typer.Option("--layer", "-l", help="Layer aliases or module paths; repeat or comma-separate "
                 "(default: all conv stages)."),
]
OldLayersOpt = Annotated[
    list[str] | None, typer.Option("--layers", hidden=True, help="Old spelling of --layer."),
]
RawOpt = Annotated[
    bool, typer.Option("--raw", help="Write the bare pictures (no caption, no colour bar, input size).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
ImagesArg = Annotated[
    list[Path], typer.Argument(help="Image files or folders (folders are searched for images).", show_default=False)
]
ClassOpt = Annotated[
    int | None, typer.Option("--class", "-c", help="Class index to explain (default: the top-1 class).")
]
LabelOpt = Annotated[
    str | None, typer.Option("--label", help="Class name to explain, e.g. 'tiger cat' (instead of --class).")
]


def class_target(class_index: int | None, label: str | None) -> int | str | None:
    """``--class`` / ``--label`` -> the target a method takes (``None``: the top-1 class)."""
    from convscope.errors import BadArgument

    if class_index is not None and label is not None:
        raise BadArgument("--class/--label", "give one of them, not both")
    return class_index if class_index is not None else label


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 picture``, ``2 pictures``; ``plural_form`` for irregular nouns."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


ImageArg = Annotated[Path, typer.Argument(help="An image file.", show_default=False)]
