"""One writer per run folder: an advisory lock file held for as long as a run writes there.

Two ``convscope train`` processes writing the same ``last.pt`` and ``metrics.jsonl`` would
interleave epochs of different runs. The lock is ``<folder>/.convscope.lock``, locked with
``flock`` (``msvcrt.locking`` on Windows). The operating system drops the lock when its process
ends, however it ends (``kill -9`` included), so a lock left by a dead process is free by
construction: the next run takes it over and can read who held it from the file's content
(pid, host, command, start time), which is also what a refused run reports.

The file is never deleted: unlinking a lock file that another process has just opened would let
two processes hold "the" lock on two different files.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convscope.errors import OutputError

LOCK_NAME = ".convscope.lock"
# Windows locks byte ranges; lock one far past the JSON so reading the holder stays possible.
_WINDOWS_LOCK_OFFSET = 1 << 20


@dataclass(frozen=True)
class RunLock:
    """A held lock.

    Attributes:
        path: the lock file.
        previous: what the file said about its last holder when we took it (``{}`` if nothing):
            a dead process's ``pid``, ``host``, ``command`` and ``started`` when it was left stale.
    """

    path: Path
    previous: dict[str, Any]


@contextmanager
def run_lock(folder: str | os.PathLike[str], command: str = "train") -> Iterator[RunLock]:
    """Hold the run lock of ``folder`` (created if missing) for the ``with`` block.

    Raises:
        OutputError: another live process holds it (the message names its pid and command), the
            lock file cannot be created, or the disk is full (``no space left on <mount>``).
    """
    from convscope.imageio import disk_full_as_error

    root = Path(folder)
    path = root / LOCK_NAME
    try:
        with disk_full_as_error(path):
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(str(path), f"cannot create the run lock: {(exc.strerror or type(exc).__name__).lower()}") from exc
    try:
        previous = _read_holder(fd)
        if not _try_lock(fd):
            raise OutputError(str(root), f"is in use by {_describe(previous)}", "wait for it to finish, or choose another --output")
        try:
            holder = (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode("utf-8")
            # Only the holder's write: an OSError of the with-block is the caller's, not the lock's.
            with disk_full_as_error(path, len(holder)):
                _write_holder(fd, holder)
            yield RunLock(path, previous)
        finally:
            with suppress(OSError):
                os.ftruncate(fd, 0)
            _unlock(fd)
    finally:
        os.close(fd)


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another convscope run"
    where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"another convscope {holder.get('command', 'run')} (pid {holder['pid']}{where}{since})"


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True
    import msvcrt

    os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    with suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            import msvcrt

            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
