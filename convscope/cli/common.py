"""What the CLI's commands share: opening a model, expanding image arguments, layer records, help text.

Every command module imports from here; nothing here imports a command module or ``main``, so the
CLI has no import circle (``main.py`` builds the app and registers the commands; nothing imports it).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from convscope.cli.errors import print_error
from convscope.errors import ImageError

if TYPE_CHECKING:
    from convscope.types import LoadedModel


def open_model(
    model: str | None,
    weights: str | None,
    seed: int,
    device: str,
    precision: str = "float32",
    output_index: int | str | None = None,
) -> LoadedModel:
    """``load_model`` (any model spec, see ``convscope.models.external``); a ``precision`` other
    than float32 stays in force until the command ends. ``output_index``: ``--output-index``."""
    from convscope.models.load import load_model, parse_output_index
    from convscope.runtime import inference_precision, resolve_precision

    resolve_precision(precision)  # a bad --precision fails before the model loads
    loaded = load_model(model, weights, seed=seed, device=device, output_index=parse_output_index(output_index))
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


def layer_records(loaded: LoadedModel, names: list[str] | None) -> list[dict[str, str]] | None:
    """``[{"layer": alias or path as named, "module": module path}]`` for JSON and manifests."""
    return None if names is None else [layer_record(loaded, name) for name in names]


def layer_record(loaded: LoadedModel, name: str) -> dict[str, str]:
    """A layer as every JSON of a run records it: the friendly name and its module path."""
    from convscope.probes.layers import alias_of

    path = loaded.stages.get(name, name)
    return {"layer": alias_of(loaded, path), "module": path}


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
