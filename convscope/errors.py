"""Errors a user can cause. Each renders as one line: ``<subject>: <reason>``.

Bugs are not ``ConvscopeError``; they stay tracebacks.
"""

from __future__ import annotations


class ConvscopeError(Exception):
    """Base class for user-caused failures.

    Args:
        subject: the offending file, model, layer or argument.
        reason: what is wrong, as a short clause.
        hint: optional remedy appended to the message.
    """

    exit_code = 2

    def __init__(self, subject: str, reason: str, hint: str | None = None) -> None:
        self.subject = str(subject)
        self.reason = reason
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.subject}: {self.reason}"
        if self.hint:
            text += f" ({self.hint})"
        # One line, always: multi-line reasons from libraries are folded.
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.message


class ImageError(ConvscopeError):
    """An image file is missing, unreadable, corrupt, too large or of an unsupported kind."""


class UnknownModel(ConvscopeError):
    """A model name is not in the registry."""


class UnknownLayer(ConvscopeError):
    """A layer name or alias does not resolve to a module."""


class UnknownMethod(ConvscopeError):
    """A method name is not in the method registry."""


class WeightsUnavailable(ConvscopeError):
    """Weights were asked for but cannot be obtained (offline, missing file)."""


class WeightsMismatch(ConvscopeError):
    """A weights file does not fit the architecture (missing/unexpected keys, shapes)."""


class BadTarget(ConvscopeError):
    """A class index or label is out of range or unknown."""


class BadArgument(ConvscopeError):
    """An option has a value that cannot work (stride 0, window larger than the image...)."""


class DataError(ConvscopeError):
    """A dataset or folder cannot be used (empty, one class, unreadable)."""


def close_matches(word: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """Return a hint like ``did you mean: a, b`` or a list of the choices when short."""
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    if near:
        return "did you mean: " + ", ".join(near)
    if len(choices) <= 30:
        return "choose from: " + ", ".join(choices)
    return "choose from: " + ", ".join(list(choices)[:30]) + f", ... ({len(choices)} in all)"


class BadWeightsFile(ConvscopeError):
    """A weights file is unreadable, not a state dict, or would execute code when unpickled."""


class BadInput(BadArgument, ValueError):
    """An image or tensor handed to a library function has a value that cannot work (no images,
    wrong channel count, NaN, too small for the network). Also a ``ValueError``."""


class BadInputType(BadArgument, TypeError):
    """An argument of a library function is of the wrong kind (``None``, a path or a numpy array
    where images are expected, a float class index). Also a ``TypeError``."""


class OutputError(ConvscopeError):
    """An output folder or file cannot be used (not a folder, not writable, a system path, in use)."""


class DamagedWeightsFile(BadWeightsFile):
    """A weights file or checkpoint changed after it was written: truncated, bit-flipped, its
    checksum does not match its contents."""


class CheckpointWriteError(ConvscopeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class TrainingDiverged(ConvscopeError):
    """Training produced a non-finite loss or weights; it stopped and kept the last good checkpoint."""
