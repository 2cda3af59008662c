"""Batched runs of the CLI: images read a batch ahead, bad files reported and skipped, a progress bar,
the run's JSON and manifest at the end, and exit code 2 when some inputs failed.

Used by the generated method commands and by the hand-written ones (``explain``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from convscope.cli.errors import EXIT_USER_ERROR, print_error
from convscope.cli.options import plural
from convscope.cli.output import OutputDir
from convscope.cli.progress import progress_bar
from convscope.errors import ImageError

if TYPE_CHECKING:
    from convscope.types import LoadedModel


def warn_once(lines: tuple[str, ...] | list[str], seen: set[str]) -> None:
    """``warning: <line>`` on stderr, once per run (not once per batch); a line that starts with
    ``note: `` (information, not a problem: occlusion's exact fallback) is printed as it is."""
    for line in lines:
        if line not in seen:
            seen.add(line)
            typer.echo(line if line.startswith("note: ") else f"warning: {line}", err=True)


def _batches(
    paths: list[Path], size: int, on_failure: Callable[[Path, ImageError], None], preprocess: Any
) -> Iterator[tuple[list[Path], list[Any]]]:
    """Yield ``(paths, tensors)`` of up to ``size`` readable images, each decoded at reduced size
    and made a ``(1, C, H, W)`` input for ``preprocess`` at once (a batch costs its input tensors,
    whatever the photos' pixel counts); unreadable ones are reported and passed to ``on_failure``.
    The next batch is decoded in a background thread while the caller works on this one."""
    from convscope.imageio import read_ahead

    pending: tuple[list[Path], list[Any]] = ([], [])
    for path, image in read_ahead(paths, lambda p: preprocess.to_tensor(preprocess.load_image(p)), depth=size):
        if isinstance(image, ImageError):
            print_error(image)
            on_failure(path, image)
            continue
        pending[0].append(path)
        pending[1].append(image)
        if len(pending[0]) >= size:
            yield pending
            pending = ([], [])
    if pending[0]:
        yield pending


def run_batched(
    paths: list[Path], loaded: LoadedModel, batch_size: int, description: str,
    job: Callable[[list[Path], Any], None], on_failure: Callable[[Path, ImageError], None] | None = None,
) -> int:
    """``job(paths, batch)`` over batches of the readable images of ``expand_images``; return how many
    files failed."""
    import torch

    failed: list[Path] = []

    def fail(path: Path, exc: ImageError) -> None:
        failed.append(path)
        if on_failure is not None:
            on_failure(path, exc)

    with progress_bar(len(paths), description, unit="img") as advance:
        for chunk, pictures in _batches(paths, batch_size, fail, loaded.preprocess):
            batch = torch.cat(pictures).to(loaded.device)
            job(chunk, batch)
            advance(len(chunk))
    return len(failed)


def finish(out: OutputDir, command: str, options: dict[str, Any], records: list[dict[str, Any]],
           json_out: bool, failures: int) -> None:
    """``<command>.json``, the manifest, the records on stdout with ``--json`` (else a count of the
    files), and exit code 2 when some inputs failed."""
    out.json(f"{command}.json", records)
    out.manifest(command, options)
    if json_out:
        typer.echo(json.dumps(records, indent=2))
    else:
        typer.echo(f"wrote {plural(len(out.written), 'file')} to {out.root}")
    if failures:
        raise typer.Exit(EXIT_USER_ERROR)


def photo_of(loaded: LoadedModel, batch: Any, index: int) -> Any:
    """Image ``index`` of ``batch`` as the network saw it, ``(H, W, 3)`` uint8."""
    from convscope.render.pictures import display_image

    return display_image(loaded.preprocess, batch, index)
