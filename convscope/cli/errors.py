"""Exceptions -> one line on stderr and an exit code. Tracebacks only with CONVSCOPE_DEBUG=1."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from convscope.errors import ConvscopeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def debug() -> bool:
    return os.environ.get("CONVSCOPE_DEBUG", "") not in ("", "0")


def report(exc: BaseException) -> str:
    """The one line shown for a user error (also used for per-file errors in batches)."""
    if isinstance(exc, ConvscopeError):
        return f"error: {exc.message}"
    if isinstance(exc, MemoryError):
        return "error: out of memory (try a smaller --batch-size or image)"
    return f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def print_error(exc: BaseException) -> None:
    typer.echo(report(exc), err=True)


class GuardedGroup(TyperGroup):
    """Runs a command and maps user errors to ``error: <subject>: <reason>`` with exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (ConvscopeError, MemoryError) as exc:
            if debug():
                raise
            print_error(exc)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            if debug():
                raise
            typer.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
