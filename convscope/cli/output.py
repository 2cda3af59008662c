"""The one output sink of the CLI: every file goes through the atomic writers, and none is clobbered.

Rules, in the order ``OutputDir`` applies them:

- The folder is checked before any work: it must be (or become) a writable folder outside the
  kernel's pseudo-filesystems; anything else is ``error: <path>: <reason>``.
- Temporary files that killed convscope runs left in the folder are removed (only the atomic
  writers' own names, only of processes that are gone).
- Every input of the run gets its own stem: inputs that share a stem (``a/cat.jpg``,
  ``a/cat.png``, ``b/cat.png``) are told apart by the part of their path that differs, then by
  their suffix, then by a number. Names too long for the file system are cut, keeping a hash.
- A file is replaced only when it is convscope's own: written earlier by a command recorded in
  the folder's ``manifest.json`` with the same SHA-256, and not an input of this run. Anything
  else (a user's photo that happens to be called ``cat_gradcam.png``) is left alone, and the new
  file gets a numbered name, said on stderr. A name is never written twice in one run.
- ``manifest.json`` is marked incomplete before the first file of a run is written, and rewritten
  last with the entries of every command that wrote into the folder, so a killed run never leaves a
  manifest that claims to describe the files. While a run writes, each file is also appended to a
  hidden journal; the next run into the folder reads the journal of a killed run, so that run's
  files are still known as convscope's (and replaced by a rerun, not numbered around).
- Names are shown, in JSON and on the terminal, with the bytes of a file name that are not UTF-8
  as U+FFFD (``caf\ufffd.jpg``); the files themselves are read and written by their real names.
- A full disk is ``error: <file>: no space left on <mount> (N bytes needed)``.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np
import typer

from convscope.atomic import os_reason, sha256_file
from convscope.errors import OutputError
from convscope.imageio import (
    atomic_write,
    disk_full_as_error,
    is_temp_name,
    png_bytes,
    process_alive,
    remove_stale_temps,
    shown_path,
    shown_text,
    temp_path,
)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FOREIGN_MANIFEST_FALLBACK = "manifest.convscope.json"  # when the folder's manifest.json is not ours
# Longest output file name, in bytes: NAME_MAX is 255 on the usual file systems, and the atomic
# writer's temporary name needs room too (it cuts what it copies, but a margin costs nothing).
NAME_BYTES = 200
_HASH_CHARS = 10
# Kernel pseudo-filesystems: writing "pictures" there either fails half-way or does something else.
_SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
_SYSTEM_EXCEPTIONS = ("/dev/shm",)  # a plain tmpfs


# Lines on the terminal: the lone surrogates of a file name that is not UTF-8 (``caf\udce9.jpg``)
# are shown as U+FFFD (``?`` on a terminal that is not UTF-8), where a strict UTF-8 stream raises
# UnicodeEncodeError after the work is done and "surrogateescape" writes bytes no terminal shows.
_PRINTABLE = "convscope-printable"


def _printable(error: UnicodeError) -> tuple[str | bytes, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    count = error.end - error.start
    if codecs.lookup(error.encoding).name == "utf-8":
        # As bytes: CPython's UTF-8 encoder takes only ASCII text from an error handler.
        return "\ufffd".encode() * count, error.end
    return "?" * count, error.end


codecs.register_error(_PRINTABLE, _printable)


@contextmanager
def printable_streams() -> Iterator[None]:
    """While the block runs, text that stdout or stderr cannot encode is shown, not raised.

    Every command runs inside it (``cli.errors.GuardedGroup``), so a file name that is not UTF-8
    is ``caf\ufffd.jpg`` in every line printed, whichever command prints it.
    """
    changed: list[tuple[Any, str | None]] = []
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None or getattr(stream, "errors", None) == _PRINTABLE:
            continue
        try:
            stream.flush()
            previous = stream.errors
            reconfigure(errors=_PRINTABLE)
        except (AttributeError, OSError, ValueError):  # closed, or a stream that cannot change
            continue
        changed.append((stream, previous))
    try:
        yield
    finally:
        for stream, previous in changed:
            with suppress(OSError, ValueError):
                stream.flush()
                stream.reconfigure(errors=previous)


def safe_name(text: str) -> str:
    """A file-name-safe form of a layer or class name (``features.3`` stays, ``a/b`` -> ``a_b``)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip(".")
    return cleaned or "_"


def safe_stem(path: str | Path) -> str:
    """A file-name-safe stem for an input path (``photos/cat 1.jpg`` -> ``cat_1``), at most 100 bytes."""
    return shorten(safe_name(Path(path).stem or "image"), NAME_BYTES // 2)


def shorten(name: str, limit: int = NAME_BYTES) -> str:
    """``name`` if it fits in ``limit`` UTF-8 bytes, else its head, a hash of the whole, and its suffix.

    Two long names that differ only at the end still get different results.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > 10:
        stem, suffix = name, ""
    tail = ("." + suffix) if suffix else ""
    digest = hashlib.sha256(encoded).hexdigest()[:_HASH_CHARS]
    room = limit - len(tail.encode()) - len(digest) - 1
    head = stem.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return f"{head}-{digest}{tail}"


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """One distinct output stem per input, in order (see the module docstring for the rules).

    Stems are compared without case, as macOS and Windows file systems do.
    """
    groups: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        groups.setdefault(safe_stem(path).casefold(), []).append(index)
    chosen = [safe_stem(path) for path in paths]
    for members in groups.values():
        if len(members) < 2:
            continue
        absolute = [Path(os.path.abspath(paths[i])) for i in members]
        try:
            common = Path(os.path.commonpath([str(p.parent) for p in absolute]))
        except ValueError:  # different drives
            common = None
        for with_suffix in (False, True):
            names = []
            for path in absolute:
                parts = list(path.parent.relative_to(common).parts) if common is not None else list(path.parent.parts[1:])
                parts.append(path.stem if not with_suffix else path.name.replace(".", "_"))
                names.append(shorten(safe_name("_".join(parts)), NAME_BYTES // 2))
            if len({n.casefold() for n in names}) == len(names):
                break
        for i, name in zip(members, names, strict=True):
            chosen[i] = name
    taken: set[str] = set()
    for i, name in enumerate(chosen):
        candidate, number = name, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = f"{name}_{number}"
        taken.add(candidate.casefold())
        chosen[i] = candidate
    return chosen


# Folders ``prepare_folder`` created in this process, outermost first: a command that fails
# before writing into them removes them again (``remove_unused_folders``), so a bad layer or
# model leaves no empty output folder behind.
CREATED_FOLDERS: list[Path] = []


def remove_unused_folders() -> None:
    """Remove the folders this process created that are still empty, innermost first.

    Only folders ``prepare_folder`` made in this run are candidates, and ``rmdir`` removes only
    empty ones, so nothing that existed before, and nothing written into them, is ever removed.
    """
    while CREATED_FOLDERS:
        folder = CREATED_FOLDERS.pop()
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (something was written), or already gone


def prepare_folder(path: str | os.PathLike[str]) -> Path:
    """Make sure ``path`` is a folder convscope can write into; create it if missing.

    Raises:
        OutputError: ``error: <path>: <reason>`` for an existing file, a device such as
            ``/dev/null``, a path under ``/proc`` or ``/sys``, or a folder that cannot be created
            or written.
    """
    folder = Path(path)
    subject = str(folder)
    real = os.path.realpath(folder)
    for system in _SYSTEM_FOLDERS:
        inside = real == system or real.startswith(system + os.sep)
        if inside and not any(real == e or real.startswith(e + os.sep) for e in _SYSTEM_EXCEPTIONS):
            if os.path.exists(real) and not os.path.isdir(real):
                raise OutputError(subject, "exists and is not a folder (it is a device or system file)")
            raise OutputError(subject, f"is inside {system}, a system folder, not a place for output files")
    if os.path.lexists(folder) and not folder.is_dir():
        kind = "file" if folder.is_file() else "device or special file" if folder.exists() else "broken link"
        raise OutputError(subject, f"exists and is not a folder (it is a {kind})", "give -o a folder")
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        with disk_full_as_error(folder):
            folder.mkdir(parents=True, exist_ok=True)
        CREATED_FOLDERS.extend(reversed(missing))  # outermost first
    except FileExistsError as exc:
        raise OutputError(subject, "cannot create the folder: a parent is a file") from exc
    except OSError as exc:
        raise OutputError(subject, f"cannot create the folder: {os_reason(exc)}") from exc
    try:
        # The only reliable test (read-only mounts, ACLs, root on NFS): create a file and remove it.
        with disk_full_as_error(folder), tempfile.NamedTemporaryFile(dir=folder, prefix=".convscope-probe-",
                                                                     suffix=".tmp"):
            pass
    except OSError as exc:
        raise OutputError(subject, f"folder is not writable: {os_reason(exc)}") from exc
    return folder


def prepare_file(path: str | os.PathLike[str], *, ours: Callable[[bytes], bool]) -> Path:
    """Make sure ``path`` can take a single output file (``explore -o report.html``).

    The folder gets the same checks as ``prepare_folder``. An existing file is replaced only when
    ``ours(first_bytes)`` says convscope wrote it; anything else (a user's page, a link, a device)
    is refused, so a typo in ``-o`` never destroys a file.

    Raises:
        OutputError: ``error: <path>: <reason>``.
    """
    target = Path(path)
    subject = str(target)
    prepare_folder(target.parent if str(target.parent) else Path("."))
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_file():
            raise OutputError(subject, "exists and is not a regular file", "choose another file name")
        try:
            with open(target, "rb") as handle:
                head = handle.read(4096)
        except OSError as exc:
            raise OutputError(subject, f"cannot read the existing file: {os_reason(exc)}") from exc
        if not ours(head):
            raise OutputError(subject, "exists and was not written by convscope; it is left as it is",
                              "remove it or choose another file name")
    return target


# Writer threads for deferred pictures (``OutputDir.png(..., defer=True)``): PNG encoding and the
# file write release the GIL, so two threads encode while the main thread computes.
WRITERS = 2


@functools.cache
def _writers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="convscope-writer")


def _encode_and_write(target: Path, picture: np.ndarray) -> bytes:
    """On a writer thread: the PNG bytes of ``picture``, written atomically to ``target``."""
    data = png_bytes(picture)
    atomic_write(target, data)
    return data


class OutputDir:
    """Writes pictures and JSON under one folder and records them for ``manifest.json``.

    Args:
        root: the folder (created; checked by ``prepare_folder``).
        inputs: the input files of this run: each gets a distinct stem (``stem(path)``), and none
            is ever replaced, even by a file of the same name.

    Attributes:
        written: names written in this run, in order, each once.
        sources: input path -> the names written for it.
    """

    def __init__(self, root: str | os.PathLike[str], *, inputs: Sequence[Path] = ()) -> None:
        self.root = prepare_folder(root)
        self._recovered = _recover_journals(self.root)
        remove_stale_temps(self.root)  # the journals just read included
        self._journal_path = temp_path(self.root / MANIFEST, "journal")
        self._journal: IO[str] | None = None
        self.written: list[str] = []
        self.sources: dict[str, list[str]] = {}
        self._taken: set[str] = set()
        self._checksums: dict[str, str] = {}
        self._pending: deque[tuple[Future[bytes], Path, Path | None]] = deque()
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._marked = False
        self._inputs = list(inputs)
        self._stems = dict(zip(map(str, self._inputs), unique_stems(self._inputs), strict=True))
        self._protected = {_identity(p) for p in self._inputs} - {None}
        self._manifest_path = self.root / MANIFEST
        self._previous = _read_manifest(self._manifest_path)
        if not self._previous and os.path.lexists(self._manifest_path):
            # Somebody else's manifest.json: never touched; ours goes next to it.
            self._manifest_path = self.root / FOREIGN_MANIFEST_FALLBACK
            self._previous = _read_manifest(self._manifest_path)

    def stem(self, path: Path) -> str:
        """The output stem of an input of this run (``safe_stem`` for a path not given as input)."""
        return self._stems.get(str(path)) or safe_stem(path)

    def png(self, name: str, picture: np.ndarray, *, source: Path | None = None, defer: bool = False) -> Path:
        """Write a picture as PNG; returns its path.

        ``defer``: encode and write it on the writer threads (``WRITERS``) while the caller goes
        on computing; the name is claimed now, and the file is recorded (``written``, the
        journal) in call order when it is done. Every other write, ``flush()`` and ``manifest()``
        wait for the deferred ones first, and at most ``2 x WRITERS`` pictures are in flight (a
        bounded queue: memory stays a few pictures). A failed deferred write raises from the call
        that waits for it.
        """
        if not defer:
            return self._write(name, png_bytes(picture), source)
        self._mark_manifest()
        target = self._claim(name)
        self._pending.append((_writers().submit(_encode_and_write, target, picture), target, source))
        self._drain(keep=2 * WRITERS)
        return target

    def flush(self) -> None:
        """Wait for every deferred picture and record it (raises the first failure)."""
        self._drain(keep=0)

    def _drain(self, keep: int) -> None:
        """Record finished deferred writes in call order; wait until at most ``keep`` are pending."""
        while self._pending and (len(self._pending) > keep or self._pending[0][0].done()):
            future, target, source = self._pending.popleft()
            try:
                data = future.result()
            except OSError as exc:
                self._abandon()
                raise OutputError(shown_path(target), f"cannot write: {os_reason(exc)}") from exc
            except BaseException:
                self._abandon()
                raise
            self._record(target, data, source)

    def _abandon(self) -> None:
        """After a failed deferred write: let the others finish (their files are whole), unrecorded."""
        for future, _, _ in self._pending:
            with suppress(BaseException):
                future.result()
        self._pending.clear()

    def json(self, name: str, payload: Any, *, source: Path | None = None) -> Path:
        return self._write(name, (_json_text(payload) + "\n").encode(), source)

    def text(self, name: str, text: str, *, source: Path | None = None) -> Path:
        return self._write(name, text.encode("utf-8"), source)

    def _write(self, name: str, data: bytes, source: Path | None) -> Path:
        self.flush()
        self._mark_manifest()
        target = self._claim(name)
        try:
            path = atomic_write(target, data)
        except OSError as exc:  # disk full, folder removed or made read-only during the run
            raise OutputError(shown_path(target), f"cannot write: {os_reason(exc)}") from exc
        return self._record(path, data, source)

    def _record(self, path: Path, data: bytes, source: Path | None) -> Path:
        # Relative to the folder, so files in sub-folders (patches' LAYER/channel_K.png) keep them.
        name = path.relative_to(self.root).as_posix()
        self.written.append(name)
        self._checksums[name] = hashlib.sha256(data).hexdigest()
        if source is not None:
            self.sources.setdefault(str(source), []).append(name)
        self._log({"name": name, "sha256": self._checksums[name],
                   "source": None if source is None else str(source), "pid": os.getpid(), "started": self._started})
        return path

    def _log(self, entry: dict[str, Any]) -> None:
        """Append to this run's journal (no fsync: it only has to survive the process, not the machine).

        The one file not written by ``atomic_write``: its lines keep names exactly (``\\udce9``
        escapes included), as the next run compares them with the folder.
        """
        lines = [json.dumps(entry) + "\n"]
        try:
            with disk_full_as_error(self._journal_path, len(lines[0].encode())):
                if self._journal is None:
                    # A second kill must not forget the first one's files.
                    lines[:0] = [json.dumps(earlier) + "\n" for earlier in self._recovered.values()]
                    self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in manifest()
                self._journal.write("".join(lines))
                self._journal.flush()
        except OSError as exc:  # the folder removed or made read-only during the run
            raise OutputError(shown_path(self._journal_path), f"cannot write: {os_reason(exc)}") from exc

    def _claim(self, name: str) -> Path:
        """The path to write ``name`` to: itself, or a numbered variant when that is taken."""
        wanted = shorten(name)
        stem, dot, suffix = wanted.rpartition(".")
        if not dot:
            stem, suffix = wanted, ""
        number = 1
        candidate = wanted
        first_reason = self._unavailable(candidate)
        why = first_reason
        while why is not None:
            number += 1
            candidate = shorten(f"{stem}_{number}" + (f".{suffix}" if suffix else ""))
            why = self._unavailable(candidate)
        if first_reason:
            typer.echo(f"warning: {self.root / wanted}: {first_reason}, left as it is; wrote {candidate}", err=True)
        self._taken.add(candidate.casefold())
        return self.root / candidate

    def _unavailable(self, name: str) -> str | None:
        """Why ``name`` cannot be written (``""``: already written in this run), or None."""
        if name.casefold() in self._taken or name in (MANIFEST, self._manifest_path.name):
            return ""
        path = self.root / name
        if not os.path.lexists(path):
            return None
        if _identity(path) in self._protected:
            return "is an input of this run"
        recorded = self._recovered.get(name, {}).get("sha256") or self._previous.get("sha256", {}).get(name)
        if recorded and path.is_file() and not path.is_symlink() and sha256_file(path) == recorded:
            return None  # written by an earlier convscope command and unchanged since
        if not recorded and name in self._previous.get("legacy_files", ()) and path.is_file() and not path.is_symlink():
            return None  # listed by a manifest from before checksums were recorded
        return "exists and was not written by convscope"

    def _mark_manifest(self) -> None:
        """Before the first write: a manifest from earlier runs no longer claims to be complete."""
        if self._marked:
            return
        self._marked = True
        if self._previous:
            marked = {**self._previous, "complete": False,
                      "running": {"pid": os.getpid(), "started": self._started}}
            marked.pop("legacy_files", None)
            atomic_write(self._manifest_path, _json_text(marked) + "\n")

    def manifest(self, command: str, options: dict[str, Any]) -> Path:
        """Written last, so a folder with a complete manifest holds what it lists.

        Keeps the entries of earlier commands whose files are still there and were not replaced
        by this run.
        """
        self.flush()
        # Read again: another command may have finished into this folder since we started.
        previous = _read_manifest(self._manifest_path) or self._previous
        mine = set(self.written)
        interrupted: dict[tuple[Any, Any], dict[str, Any]] = {}
        for name, entry in self._recovered.items():
            run = interrupted.setdefault((entry.get("pid"), entry.get("started")), {
                "command": None, "interrupted": True, "pid": entry.get("pid"), "started": entry.get("started"),
                "files": [], "inputs": {}})
            run["files"].append(name)
            if entry.get("source"):
                run["inputs"].setdefault(entry["source"], []).append(name)
        recorded = {**previous.get("sha256", {}), **{n: e["sha256"] for n, e in self._recovered.items()}}
        for name in {*previous.get("legacy_files", ()), *self._previous.get("legacy_files", ())} - set(recorded) - mine:
            path = self.root / name
            if path.is_file() and not path.is_symlink():
                recorded[name] = sha256_file(path)  # once: from now on the manifest carries it
        checksums = {name: digest for name, digest in recorded.items()
                     if name not in mine and (self.root / name).is_file()}
        runs = []
        for run in [*previous.get("runs", []), *interrupted.values()]:
            files = [f for f in run.get("files", []) if f in checksums]
            if files:
                inputs = {k: [f for f in v if f in checksums] for k, v in run.get("inputs", {}).items()}
                runs.append({**run, "files": files, "inputs": {k: v for k, v in inputs.items() if v}})
        checksums.update(self._checksums)
        runs.append({
            "command": command, "options": options, "started": self._started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": list(self.written), "inputs": self.sources,
        })
        payload = {
            "schema_version": SCHEMA_VERSION, "complete": True, "command": command, "options": options,
            "files": sorted(checksums), "inputs": self.sources, "runs": runs, "sha256": checksums,
        }
        if self._manifest_path.name != MANIFEST:
            typer.echo(f"warning: {self.root / MANIFEST}: not a convscope manifest, left as it is; "
                       f"wrote {self._manifest_path.name}", err=True)
        written = atomic_write(self._manifest_path, _json_text(payload) + "\n")
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._journal_path.unlink(missing_ok=True)
        return written


def _recover_journals(folder: Path) -> dict[str, dict[str, Any]]:
    """Files that killed runs wrote into ``folder`` and that are still as they wrote them: name -> entry."""
    recovered: dict[str, dict[str, Any]] = {}
    journals = sorted(folder.glob(f".{MANIFEST}.convscope-*-journal.tmp"), key=lambda p: p.stat().st_mtime)
    for journal in journals:
        pid = journal.name.rsplit("-", 2)[-2]
        if not is_temp_name(journal.name) or not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            lines = journal.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
                name, digest = entry["name"], entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # the line being written when the process died
            path = folder / name
            if isinstance(name, str) and path.is_file() and not path.is_symlink() and sha256_file(path) == digest:
                recovered[name] = entry
    return recovered


def _read_manifest(path: Path) -> dict[str, Any]:
    """A convscope manifest's content, or ``{}`` (missing, unreadable, or not ours)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or "schema_version" not in payload or not isinstance(payload.get("files"), list):
        return {}
    if not isinstance(payload.get("sha256"), dict):
        payload["sha256"] = {}
    if not isinstance(payload.get("runs"), list):
        # A manifest from before runs and checksums were recorded: it lists only files it wrote.
        payload["runs"] = [{"command": payload.get("command"), "options": payload.get("options"),
                            "files": [f for f in payload["files"] if isinstance(f, str)]}]
        payload["legacy_files"] = set(payload["runs"][0]["files"])
    return payload


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _json_text(payload: Any) -> str:
    """``payload`` as strict JSON: NaN and Infinity (which strict parsers reject) become null, and
    the lone surrogates of a file name that is not UTF-8 (which they reject too) become U+FFFD."""
    return json.dumps(_finite(payload), indent=2, default=_plain, allow_nan=False)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and every string (keys too) and path
    made printable by ``shown_text`` (lists, tuples, sets and dicts walked)."""
    if isinstance(value, str):
        return shown_text(value)
    if isinstance(value, PurePath):
        return shown_path(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_finite(key) if isinstance(key, (str, PurePath)) else key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, bytes):
        return _finite(value.tolist())
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return shown_path(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return shown_text(str(value))
