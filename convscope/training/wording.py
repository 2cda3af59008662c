"""How training's errors name the options that caused or resolve them.

The library is called with parameters (``train(TrainConfig(epochs=0))``), the CLI with flags
(``--epochs 0``); one error should speak the caller's language. So an error that names an option
is built from templates whose ``{name}`` fields are parameter names (``"{epochs} 0"``,
``"start the run without {resume}"``). The library fills them with the parameter itself
(``epochs 0``; a switch as ``resume=True``), and a front end re-words the same error with its own
names: ``worded(error, flag)`` with the CLI's ``flag("epochs") == "--epochs"``.

Values put into a template go through ``literal`` (a folder or file name may hold braces).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from convscope.errors import ConvscopeError

# How the library names a switch that resolves an error; every other option is its parameter name.
PARAMETERS: Mapping[str, str] = {"resume": "resume=True", "overwrite": "overwrite=True"}

Naming = Callable[[str], str]
E = TypeVar("E", bound=ConvscopeError)


def parameter(name: str) -> str:
    """The library's name for option ``name``: the parameter (``resume=True`` for a switch)."""
    return PARAMETERS.get(name, name)


def literal(text: object) -> str:
    """``text`` safe inside a template (a file name may hold braces)."""
    return str(text).replace("{", "{{").replace("}", "}}")


class _Names(dict[str, str]):
    def __init__(self, naming: Naming) -> None:
        super().__init__()
        self.naming = naming

    def __missing__(self, key: str) -> str:
        return self.naming(key)


def fill(template: str, naming: Naming = parameter) -> str:
    """``template`` with each ``{name}`` replaced by ``naming(name)``."""
    return template.format_map(_Names(naming))


def option_error(kind: type[E], subject: str, reason: str, hint: str | None = None) -> E:
    """A ``kind`` error from templates, naming options as parameters; ``worded`` re-words it."""
    error = kind(fill(subject), fill(reason), None if hint is None else fill(hint))
    error.templates = (subject, reason, hint)  # type: ignore[attr-defined]
    return error


def worded(error: E, naming: Naming | Mapping[str, str]) -> E:
    """The same error naming its options as ``naming`` says; ``error`` itself when it names none.

    Args:
        naming: option name -> the caller's word for it (``"epochs"`` -> ``"--epochs"``), as a
            function or a mapping (names it lacks keep the library's word).
    """
    templates: tuple[str, str, str | None] | None = getattr(error, "templates", None)
    if templates is None:
        return error
    if isinstance(naming, Mapping):
        names = naming
        naming = lambda name: names.get(name) or parameter(name)
    subject, reason, hint = templates
    # A copy, not the caught error changed in place: the original stays what the library raised.
    again = type(error).__new__(type(error))
    again.__dict__.update(error.__dict__)
    again.subject, again.reason = fill(subject, naming), fill(reason, naming)
    again.hint = None if hint is None else fill(hint, naming)
    again.args = (again.message,)
    return again
