"""Reusable typed options (Annotated aliases) shared by all commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convscope.models.registry import DEFAULT_MODEL


def _model_names(incomplete: str = "") -> list[str]:
    """Completion: built-in names and the ``torchvision:``/``timm:`` prefixes, then their names."""
    from convscope.models.registry import list_models

    for source in ("torchvision", "timm"):
        if incomplete.startswith(source + ":"):
            from convscope.models import external

            names = external.torchvision_names() if source == "torchvision" else external.timm_names() or []
            return [f"{source}:{n}" for n in names if f"{source}:{n}".startswith(incomplete)]
    return [n for n in [*list_models(), "torchvision:", "timm:"] if n.startswith(incomplete)]


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help=f"Model (default: {DEFAULT_MODEL}, or the one recorded in a --weights checkpoint): a built-in "
        "name, torchvision:NAME, timm:NAME, FILE.py:FUNCTION or package.module:FUNCTION (a factory "
        "returning an nn.Module; runs that code), or a torch.export FILE.pt2. "
        "See 'convscope models --all'.",
        autocompletion=_model_names,
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w",
        help="'pretrained', 'random', or a weights file (a .pth/.pt state dict, .safetensors, a convscope "
        "checkpoint) for any --model (default: pretrained when the model has published weights, "
        "torchvision:/timm: included, else random; a factory or .pt2 keeps its own).",
    ),
]


def _output_index(value: str | None) -> int | str | None:
    from convscope.models.load import parse_output_index

    return parse_output_index(value)


OutputIndexOpt = Annotated[
    str | None,
    typer.Option(
        "--output-index", metavar="N|KEY", callback=_output_index,
        help="For a model returning a tuple/list or a dict: the position or key of its logits.",
    ),
]
# torch.manual_seed takes 64 bits and a larger seed ended in an overflow traceback; 63 bits leave
# room for the seed + k that derived generators use.
SEED_MAX = 2**63 - 1


def _check_seed(value: int) -> int:
    # A callback rather than min/max: click prints an IntRange's 19-digit bounds in the help table,
    # which squeezed every other option's help into a sliver at 80 columns.
    if not 0 <= value <= SEED_MAX:
        raise typer.BadParameter(f"must be between 0 and 2^63-1 (9223372036854775807), got {value}")
    return value


SeedOpt = Annotated[
    int, typer.Option("--seed", callback=_check_seed, help="Seed for --weights random (0 .. 2^63-1).")
]


def check_device(value: str) -> str:
    """``--device``: auto, cpu, cuda, cuda:N or mps; anything else is one error line.

    The well-formed names pass here without importing torch (whether the machine has the device is
    checked when the model is loaded); anything else gets the library's own message from
    ``models.load.resolve_device``, the one place that judges devices.
    """
    text = value.strip().lower()
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return text
    from convscope.errors import BadArgument
    from convscope.models.load import DEVICE_CHOICES, resolve_device

    resolve_device(value)  # raises BadArgument naming what is wrong with this device
    raise BadArgument(f"--device {value}", "not a device convscope can run on", f"use {DEVICE_CHOICES}")


DeviceOpt = Annotated[
    str, typer.Option("--device", callback=check_device, help="auto (CUDA when present), cpu, cuda, cuda:N, mps.")
]
# readable=False: click's own check would end the whole command in a usage box; convscope checks itself.
OutDirOpt = Annotated[Path, typer.Option("--output", "-o", readable=False, help="Folder for the pictures (created).")]
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
    list[Path],
    # readable=False: an unreadable file is reported by load_image like any bad image, and the batch goes on.
    typer.Argument(readable=False, help="Image files or folders (folders are searched for images).", show_default=False),
]
def _class_index(text: str) -> int:
    """``--class``: ASCII digits only, through the one class-index parser (typer's integer check
    reads ``1_0`` as 10 and words its errors its own way)."""
    from convscope.errors import BadTarget
    from convscope.parsing import parse_class_index, shown

    if isinstance(text, int):  # typer hands the default through
        return text
    value = parse_class_index(text, subject="--class")
    if isinstance(value, str):
        raise BadTarget(f"--class {shown(value)}", "is not a class index (0, 1, ...)", "give a class name with --label")
    return value


ClassOpt = Annotated[
    int | None,
    typer.Option("--class", "-c", parser=_class_index, help="Class index to explain (default: the top-1 class)."),
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


ImageArg = Annotated[Path, typer.Argument(readable=False, help="An image file.", show_default=False)]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="float32, or bf16: bfloat16 autocast where the hardware computes it natively "
        "(AMX / AVX-512-BF16 CPUs, recent CUDA GPUs); elsewhere float32 with a note.",
    ),
]
