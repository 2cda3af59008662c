"""``Param``: one typed option of a method. One declaration parses, bounds and documents the option for
the CLI, the web form and the Python API alike, so all three accept the same values and say the same
thing about the bad ones (numbers through ``convscope.parsing``: ASCII only, finite, bounded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from convscope.errors import BadArgument
from convscope.parsing import MAX_DIGITS, parse_float, parse_int, shown

PARAM_TYPES = ("int", "float", "str", "bool", "fill")

# The occluder colours a user can name; any number is also accepted (normalised input space).
FILL_NAMES = ("grey", "black", "white")


@dataclass(frozen=True)
class Param:
    """One option of a method.

    Attributes:
        name: keyword argument of the method's function (also the web form field and JSON key).
        type: ``"int"``, ``"float"``, ``"str"``, ``"bool"``, or ``"fill"`` (a colour name from
            ``choices`` or any finite number).
        default: the value when the option is not given (the CLI's default).
        help: one sentence for ``--help``, tooltips and the API docs.
        choices: the allowed strings (``str`` and ``fill`` types).
        minimum, maximum: bounds for numbers (inclusive).
        flag: the CLI option spelling (``"--max"``), or ``None`` when the CLI has no such option.
        optional: ``None`` is a valid value (``channel``: "let the method choose").
        multiple: the value is a list of the type (a repeatable CLI option; a form's
            comma-separated text); ``None`` or empty is the default.
        unit: what a number counts (``"pixels"``): bad values read "must be a whole number of
            pixels, at least 1", as the library words them. The CLI checks such a number through
            ``parse`` only (not with click's range), so both say the same.
    """

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    flag: str | None = None
    optional: bool = False
    multiple: bool = False
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name}: type must be one of {PARAM_TYPES}, not {self.type!r}")

    @property
    def subject(self) -> str:
        return self.flag or self.name

    def parse(self, raw: Any) -> Any:
        """A raw value (a form string, a JSON value, a Python value) -> the typed value.

        Raises:
            BadArgument: naming the option and what it accepts.
        """
        if self.multiple:
            if isinstance(raw, str):
                items = raw.split(",")
            elif isinstance(raw, Iterable):
                items = list(raw)
            else:  # one JSON number for a list option
                items = [] if raw is None else [raw]
            values = [self._parse_one(item) for item in items if not (isinstance(item, str) and not item.strip())]
            return values or (None if self.optional else self.default)
        return self._parse_one(raw)

    def _parse_one(self, raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            if self.optional:
                return None
            return self.default
        text = raw.strip() if isinstance(raw, str) else raw
        subject = f"{self.subject} {shown(raw)}"
        if self.type == "bool":
            if isinstance(text, bool):
                return text
            folded = str(text).lower()
            if folded in ("1", "true", "yes", "on"):
                return True
            if folded in ("0", "false", "no", "off"):
                return False
            raise BadArgument(subject, "must be true or false")
        if self.type == "int":
            return self._bounded(self._whole(text, subject), subject)
        if self.type == "float":
            return self._bounded(self._number(text, subject, "must be a number", "must be a finite number"), subject)
        if self.type == "fill":
            folded = text.lower() if isinstance(text, str) else text
            if folded == "gray":
                folded = "grey"
            if self.choices and folded in self.choices:
                return folded
            names = ", ".join(self.choices or ())
            return self._number(folded, subject, f"is not {names} or a number",
                                f"must be {names + ' or ' if names else ''}a finite number")
        value = str(text)
        if self.choices is not None and value not in self.choices:
            raise BadArgument(subject, "is not one of " + ", ".join(self.choices))
        return value

    def _whole(self, value: Any, subject: str) -> int:
        """A whole number from text (ASCII digits, through ``convscope.parsing``) or a JSON number."""
        if isinstance(value, str):
            try:
                return parse_int(value, subject=self.subject)
            except BadArgument as exc:
                if exc.reason == "must be a whole number":
                    raise BadArgument(subject, self._whole_number()) from None
            # ASCII digits, but more than any bound could allow: name the bound on that side.
            self._bounded(-math.inf if value.startswith("-") else math.inf, subject)
            raise BadArgument(subject, f"is out of range: at most {MAX_DIGITS} digits")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadArgument(subject, self._whole_number())

    @staticmethod
    def _number(value: Any, subject: str, not_a_number: str, not_finite: str) -> float:
        """A finite float from text (ASCII decimal notation) or a JSON number."""
        if isinstance(value, str):
            try:
                return parse_float(value, subject="")
            except BadArgument as exc:
                raise BadArgument(subject, not_finite if "finite" in exc.reason else not_a_number) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                raise BadArgument(subject, not_finite) from None
            if not math.isfinite(number):
                raise BadArgument(subject, not_finite)
            return number
        raise BadArgument(subject, not_a_number)

    def _whole_number(self) -> str:
        if self.unit is None:
            return "must be a whole number"
        return f"must be a whole number of {self.unit}" + (f", at least {self.minimum:g}" if self.minimum is not None else "")

    def _bounded(self, value: float, subject: str) -> Any:
        if self.minimum is not None and value < self.minimum:
            if self.unit is not None and self.type == "int":
                raise BadArgument(subject, self._whole_number())
            raise BadArgument(subject, f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise BadArgument(subject, f"must be at most {self.maximum:g}")
        return value

    def schema(self) -> dict[str, Any]:
        """JSON description (web form, ``/api/methods``)."""
        return {
            "name": self.name, "type": self.type, "default": self.default, "help": self.help,
            "choices": list(self.choices) if self.choices is not None else None,
            "minimum": self.minimum, "maximum": self.maximum, "optional": self.optional, "flag": self.flag,
            "multiple": self.multiple,
        }
