"""Exceptions -> one line on stderr and an exit code. Tracebacks only with CONVSCOPE_DEBUG=1."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from convscope.cli.output import CREATED_FOLDERS, printable_streams, remove_unused_folders
from convscope.errors import ConvscopeError
from convscope.imageio import disk_full_error, shown_text

EXIT_USER_ERROR = 2
# click's UsageError, from whichever click typer uses (recent typer versions vendor their own copy).
UsageError: type[Exception] = typer.BadParameter.__mro__[1]
EXIT_INTERRUPTED = 130


def debug() -> bool:
    return os.environ.get("CONVSCOPE_DEBUG", "") not in ("", "0")


def report(exc: BaseException) -> str:
    """The one line shown for a user error (also used for per-file errors in batches).

    A file name that is not UTF-8 is shown with U+FFFD for its bad bytes.
    """
    if isinstance(exc, ConvscopeError):
        return shown_text(f"error: {exc.message}")
    if isinstance(exc, MemoryError):
        return "error: out of memory (try a smaller --batch-size or image)"
    if isinstance(exc, OSError) and (full := disk_full_error(exc)) is not None:
        return shown_text(f"error: {full.message}")
    return shown_text(f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def usage_line(exc: Any) -> str:
    """``error: <option>: <reason> (see '<command> --help')`` for click's parsing errors."""
    reason = " ".join(str(getattr(exc, "message", "") or "").split()).rstrip(".")
    param = getattr(exc, "param", None)
    subject = ""
    if not reason:  # a missing argument or option: click words the whole message itself
        reason = " ".join(exc.format_message().split()).rstrip(".")
    elif param is not None:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("-")]
        subject = "/".join(opts) if opts else (getattr(param, "name", None) or "argument").upper()
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "convscope"
    return f"error: {subject + ': ' if subject else ''}{reason} (see '{command} --help')"


def print_error(exc: BaseException) -> None:
    typer.echo(report(exc), err=True)


class GuardedGroup(TyperGroup):
    """Runs a command and maps user errors to ``error: <subject>: <reason>`` with exit code 2.

    A full disk is a user error too, wherever the write that met it was made: the writers of
    ``imageio`` raise it as ``OutputError``, and a bare ``OSError`` (ENOSPC, EDQUOT) from any other
    write gets the same line here. While the command runs, stdout and stderr show what they
    cannot encode (``cli.output.printable_streams``).
    """

    def invoke(self, ctx: Any) -> Any:
        CREATED_FOLDERS.clear()  # only this command's folders are ever candidates
        with printable_streams():
            try:
                return self._invoke(ctx)
            except BaseException as exc:
                if getattr(exc, "exit_code", getattr(exc, "code", 1)) not in (0, None):
                    # A failed command leaves no empty output folder of its own making behind.
                    remove_unused_folders()
                raise

    def _invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            # A bad option value (--topk 0, --seed 2**64) is a user error like any other: one line,
            # not click's framed usage box.
            if debug():
                raise
            typer.echo(usage_line(exc), err=True)
            ctx.exit(EXIT_USER_ERROR)
        except (ConvscopeError, MemoryError) as exc:
            if debug():
                raise
            print_error(exc)
            ctx.exit(EXIT_USER_ERROR)
        except OSError as exc:
            if debug() or disk_full_error(exc) is None:
                raise  # any other OSError here is a bug: its traceback is wanted
            print_error(exc)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            if debug():
                raise
            typer.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
