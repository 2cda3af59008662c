"""The one place that turns text a user typed into numbers and class indices.

Python's own ``int`` and ``float`` accept far more than a person means: ``int("²")`` fails but
``"²".isdigit()`` is true, ``int("١٢")`` is 12, ``int("1_000")`` is 1000, ``int`` of a 5000-digit
string raises a ``ValueError`` about the interpreter's digit limit, ``float("inf")`` and
``float("nan")`` are numbers, and ``float("1e308") * 10`` overflows later, far from the input.
Every parser here accepts ASCII only, checks the length before converting, refuses non-finite
values, and raises ``BadArgument`` (or ``BadTarget``) naming the subject the caller gives it: a
CLI flag (``--target``) from the CLI, a form field (``target``) from the web app. So any string
gives a value in range or one ``error:`` line, never an exception of another kind.
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

from convscope.errors import BadArgument, BadTarget

_Number = TypeVar("_Number", int, float)

# Longest run of digits accepted before converting: far beyond any class count or size, far below
# Python's 4300-digit conversion limit.
MAX_DIGITS = 18

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
# Text that looks like a number to a person (signs, digits in any script, dots): never a label.
_NUMBERISH = re.compile(r"[\s+\-.]*\d[\d\s+\-.]*")


def parse_class_index(text: str, *, subject: str = "target") -> int | str:
    """A class given as text: an index (ASCII digits only) or a label name, returned as given.

    Args:
        text: the user's text (surrounding white space is ignored).
        subject: how the error names the input (``--target``, ``target``).

    Returns:
        An ``int`` >= 0 for ``"285"``; the stripped text for a label name (``"tiger cat"``), which
        the caller resolves against the model's categories.

    Raises:
        BadTarget: a negative or signed index (``-5``, ``--5``, ``+3``), an index longer than
            ``MAX_DIGITS`` digits, digits outside ASCII (``²``, ``١٢``), or an empty text.
    """
    stripped = text.strip()
    if not stripped:
        raise BadTarget(f"{subject} {text!r}", "is empty", "give a class index (0, 1, ...) or a class name")
    if stripped.isascii() and stripped.isdigit():
        if len(stripped) > MAX_DIGITS:
            raise BadTarget(f"{subject} {shown(stripped)}", "is out of range: a class index has at most "
                            f"{MAX_DIGITS} digits")
        return int(stripped)
    # \d is Unicode decimals only: superscripts and other digits ("²".isdigit()) count as digits too.
    if _NUMBERISH.fullmatch("".join("0" if ch.isdigit() else ch for ch in stripped)):
        raise BadTarget(f"{subject} {shown(stripped)}",
                        "is not a class index: use the digits 0-9 only, no sign (0 is the first class)")
    return stripped


def parse_int(text: str, *, subject: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number in ``[minimum, maximum]`` from text (ASCII digits, an optional sign).

    Raises:
        BadArgument: not a whole number, too many digits, or out of bounds.
    """
    stripped = text.strip()
    if not _INT.fullmatch(stripped):
        raise BadArgument(f"{subject} {shown(text)}", "must be a whole number")
    if len(stripped.lstrip("+-")) > MAX_DIGITS:
        raise BadArgument(f"{subject} {shown(text)}", _bounds_reason(minimum, maximum, "is out of range"))
    return check_bounds(int(stripped), subject=subject, shown=shown(text), minimum=minimum, maximum=maximum)


def parse_float(text: str, *, subject: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number in ``[minimum, maximum]`` from text (ASCII decimal notation).

    ``nan``, ``inf``, ``1e999`` (which overflows to infinity) and hexadecimal floats are refused.

    Raises:
        BadArgument: not a number, not finite, or out of bounds.
    """
    stripped = text.strip()
    if not _FLOAT.fullmatch(stripped):
        folded = stripped.lower().lstrip("+-")
        if folded in ("nan", "inf", "infinity"):
            raise BadArgument(f"{subject} {shown(text)}", "must be a finite number")
        raise BadArgument(f"{subject} {shown(text)}", "must be a number")
    value = float(stripped)
    if not math.isfinite(value):
        raise BadArgument(f"{subject} {shown(text)}", "must be a finite number")
    return check_bounds(value, subject=subject, shown=shown(text), minimum=minimum, maximum=maximum)


def check_bounds(value: _Number, *, subject: str, shown: str | None = None, minimum: float | None = None,
                 maximum: float | None = None) -> _Number:
    """``value`` when it lies in ``[minimum, maximum]``, else ``BadArgument`` naming the bounds."""
    if not math.isfinite(value):
        raise BadArgument(f"{subject} {shown if shown is not None else value}", "must be a finite number")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadArgument(f"{subject} {shown if shown is not None else value}", _bounds_reason(minimum, maximum))
    return value


def _bounds_reason(minimum: float | None, maximum: float | None, prefix: str = "must be") -> str:
    if prefix != "must be":
        prefix += ";"
        lead = f"{prefix} it must be"
    else:
        lead = prefix
    if minimum is not None and maximum is not None:
        return f"{lead} between {minimum:g} and {maximum:g}"
    if minimum is not None:
        return f"{lead} at least {minimum:g}"
    if maximum is not None:
        return f"{lead} at most {maximum:g}"
    return prefix.rstrip(";")


def shown(text: object, limit: int = 40) -> str:
    """The user's text (or a value) for a message: one line, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
