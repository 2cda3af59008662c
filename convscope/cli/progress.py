"""Progress bars for the CLI: drawn only when stderr is a terminal; the library sees a callback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressCallback = Callable[[int], None]


def show_progress() -> bool:
    return sys.stderr.isatty() and os.environ.get("CONVSCOPE_NO_PROGRESS", "") in ("", "0")


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "it") -> Iterator[ProgressCallback]:
    """Yield ``advance(n)``; draws a tqdm bar on a TTY, does nothing when piped."""
    if not show_progress():

        def ignore(n: int = 1) -> None:
            return None

        yield ignore
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(n: int = 1) -> None:
        bar.update(n)

    try:
        yield advance
    finally:
        bar.close()
