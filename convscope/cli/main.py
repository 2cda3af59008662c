"""The root of the ``convscope`` command line: builds the typer app and registers every command.

Command modules hold plain typed functions and import only ``common``, ``options``, ``output`` and the
library; this module imports them and registers each under its name, in the order ``--help`` lists
them. Nothing imports this module back (the console script and ``python -m convscope`` call ``main``),
so the CLI has no import circle. The method commands (classify ... occlusion) are generated from the
method registry by ``methods_cmd.register_method_commands``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from convscope.cli import (
    analysis_cmd,
    atlas_cmd,
    explain,
    featurevis_cmd,
    info_cmd,
    methods_cmd,
    patches_cmd,
    train_cmd,
    web_cmd,
)
from convscope.cli.common import reflow_help
from convscope.cli.errors import GuardedGroup

app = typer.Typer(
    cls=GuardedGroup,
    help="convscope: see what a convolutional network sees.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def startup(
    no_tune: Annotated[
        bool,
        typer.Option("--no-tune", envvar="CONVSCOPE_NO_TUNE",
                     help="Leave the C memory allocator untuned (see convscope.tune_cpu)."),
    ] = False,
) -> None:
    # Large CPU batches run about twice as fast with glibc's allocator tuned; results are
    # identical. The library never does this on import, so the CLI does it here (without torch).
    if not no_tune:
        from convscope.cli.errors import debug
        from convscope.runtime import tune_cpu

        report = tune_cpu()
        if debug():
            typer.echo(f"convscope: {report.note} ({report.libc})", err=True)


# The hand-written commands, in --help order; the generated method commands go after "layers".
COMMANDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("models", info_cmd.models_command),
    ("layers", info_cmd.layers_command),
    ("summary", info_cmd.summary_command),
    ("demo", info_cmd.demo_command),
    ("invariance", analysis_cmd.invariance_command),
    ("correspondence", analysis_cmd.correspondence_command),
    ("quality", analysis_cmd.quality_command),
    ("explain", explain.explain_command),
    ("patches", patches_cmd.patches_command),
    ("atlas", atlas_cmd.atlas_command),
    ("featurevis", featurevis_cmd.featurevis_command),
    ("train", train_cmd.train_command),
    ("evaluate", train_cmd.evaluate_command),
    ("ablate", train_cmd.ablate_command),
    ("explore", web_cmd.explore_command),
    ("serve", web_cmd.serve_command),
)

for _name, _function in COMMANDS:
    _doc = inspect.getdoc(_function)
    app.command(_name, help=reflow_help(_doc) if _doc else None)(_function)
methods_cmd.register_method_commands(app)


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
