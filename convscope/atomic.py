"""Every file convscope writes: atomically, never half-written, with one line when the disk is full.

``atomic_write`` and ``atomic_path`` write to a hidden temporary file in the same folder, then
``os.replace`` it over the final name, so a crash leaves the old file or the new one, never a part.
The temporary names carry the writer's pid, so a later run removes only the leftovers of dead
processes (``remove_stale_temps``), and nobody else's ``.tmp`` files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from convscope.errors import OutputError


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` so that it is always either the old or the new file, never partial.

    ``str`` is written as UTF-8 without newline translation. Creates missing parent folders. On any
    failure the temporary file is removed, the previous content of ``path`` is untouched and the
    exception propagates.

    Returns:
        ``path`` as a ``Path``.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target = Path(path)
    with disk_full_as_error(target, len(payload)):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _temp_file(target) as handle:
            temp = Path(handle.name)
            try:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:
                handle.close()
                temp.unlink(missing_ok=True)
                raise
        _commit(temp, target)
    return target


# A full disk (or quota) is the user's to fix, not a bug: one line, with what was needed.
_NO_SPACE = (28, 122)  # ENOSPC, EDQUOT


@contextmanager
def disk_full_as_error(path: str | os.PathLike[str], needed: int | None = None) -> Iterator[None]:
    """Turn "no space left" while writing ``path`` into ``OutputError``: ``no space left on <mount>``.

    Args:
        path: the file being written (its mount point is named in the message).
        needed: bytes the write needed, when known.

    Raises:
        OutputError: ``<path>: no space left on <mount> (N bytes needed)``; other OSErrors pass.
    """
    try:
        yield
    except OSError as exc:
        error = disk_full_error(exc, path, needed)
        if error is None:
            raise
        raise error from exc


def disk_full_error(
    exc: OSError, path: str | os.PathLike[str] | None = None, needed: int | None = None
) -> OutputError | None:
    """The ``OutputError`` for a "no space left" or "quota exceeded" ``exc``; None for any other error.

    Args:
        path: the file being written (default: ``exc.filename``); without one the message says
            ``output: no space left on device``.
        needed: bytes the write needed, when known.
    """
    if exc.errno not in _NO_SPACE:
        return None
    if path is None and isinstance(exc.filename, (str, os.PathLike)):
        path = exc.filename
    what = "no space left" if exc.errno == _NO_SPACE[0] else "disk quota exceeded"
    amount = f" ({needed} bytes needed)" if needed is not None else ""
    where = shown_path(_mount_point(Path(path))) if path is not None else "device"
    return OutputError(shown_path(path) if path is not None else "output", f"{what} on {where}{amount}",
                       "free some space and run again")


def shown_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path as text for people, in messages, pages and JSON: bytes that are not UTF-8 become U+FFFD.

    Python holds such a name (``b"caf\\xe9.jpg"``) as ``"caf\\udce9.jpg"``, which no UTF-8 file or
    strict terminal accepts; the file itself is still opened by its real bytes.
    """
    raw = os.fspath(path)
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else shown_text(raw)


def shown_text(text: str) -> str:
    """``text`` with the lone surrogates of undecodable bytes (and any other) as U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _mount_point(path: Path) -> str:
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    while current != current.parent and not os.path.ismount(current):
        current = current.parent
    return str(current)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    For writers that want a file name (``torch.save``, ``PIL.Image.save``). The temporary name ends
    in ``.tmp``, so pass the format explicitly: ``image.save(temp, format="PNG")``; writers that add
    their own suffix (``numpy.save``) need an open file instead. On any exception in the block the
    temporary file is removed and ``path`` keeps its previous content.
    """
    target = Path(path)
    with disk_full_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _temp_file(target) as handle:
            temp = Path(handle.name)
    try:
        with disk_full_as_error(target):
            yield temp
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    with disk_full_as_error(target):
        _commit(temp, target)


# Temporary files of the atomic writers: ``.<target name>.convscope-<pid>-<random>.tmp``. Hidden, so
# iter_images never picks one up; the pid tells a live writer's file from a leftover of a killed
# run, and the ``convscope-`` tag keeps ``remove_stale_temps`` away from anyone else's ``.tmp`` files.
_TEMP_TAG = ".convscope-"
_TEMP_PATTERN = re.compile(r"^\..*\.convscope-(\d+)-[A-Za-z0-9_]+\.tmp$", re.DOTALL)
# Room left for the tag, the pid, the random part and ".tmp" under the usual 255-byte NAME_MAX.
_TEMP_NAME_BYTES = 160


def _temp_file(target: Path) -> IO[bytes]:
    # The callers' ``with`` closes it.
    return tempfile.NamedTemporaryFile(
        dir=target.parent, delete=False, prefix=_temp_prefix(target), suffix=".tmp"
    )


def _temp_prefix(target: Path) -> str:
    # Cut by bytes, not characters: NAME_MAX counts bytes, and a name in CJK is 3 bytes a character.
    name = target.name.encode("utf-8", "surrogateescape")[:_TEMP_NAME_BYTES].decode("utf-8", "ignore")
    return f".{name}{_TEMP_TAG}{os.getpid()}-"


def temp_path(target: str | os.PathLike[str], label: str) -> Path:
    """A hidden side file of this process next to ``target``, named like the atomic writers'
    temporary files: ``remove_stale_temps`` deletes it once this process is gone.

    ``label`` is letters, digits and ``_`` only (it takes the random part's place).
    """
    path = Path(target)
    return path.parent / f"{_temp_prefix(path)}{label}.tmp"


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file made by ``atomic_write`` / ``atomic_path``."""
    return _TEMP_PATTERN.match(name) is not None


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed convscope processes left in ``folder``.

    Only names of the atomic writers' pattern are touched, and only those whose writing process
    is gone, so a run writing into the same folder at this moment keeps its files. Not recursive.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if process_alive(int(match.group(1))):
            continue
        with suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (our own counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill there terminates the process; keep the file rather than guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except OSError:
        return False
    return True


def _commit(temp: Path, target: Path) -> None:
    try:
        # NamedTemporaryFile creates 0600; give the result the mode a plain open() would have.
        os.chmod(temp, _existing_mode(target))
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _existing_mode(target: Path) -> int:
    with suppress(OSError):
        return stat.S_IMODE(target.stat().st_mode)
    return 0o666 & ~_umask()


@functools.cache
def _umask() -> int:
    # The only way to read the umask is to set it; done once, and put straight back.
    current = os.umask(0o022)
    os.umask(current)
    return current


def save_png(path: str | os.PathLike[str], image: Image.Image | np.ndarray) -> Path:
    """Encode ``image`` as PNG in memory, then ``atomic_write`` it.

    Args:
        image: a PIL image, or a uint8 array ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB).

    Raises:
        TypeError: an array that is not uint8.
        ValueError: an array of another shape.
    """
    return atomic_write(path, png_bytes(image))


# zlib level of every PNG convscope writes. Measured (Pillow, a 680x680 photo-like picture):
# level 6, Pillow's default, 289 ms and 474 KiB; level 3, 84 ms and 506 KiB; level 1, 59 ms and
# 534 KiB (4.9x faster, 13% larger); level 0, 28 ms but 1.4 MiB. Maps and figures (flat colour)
# encode in about 10 ms at level 1. PNG is lossless at every level: the pixels read back equal.
PNG_COMPRESS_LEVEL = 1


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """The PNG encoding of ``image`` (the rules of ``save_png``), at ``PNG_COMPRESS_LEVEL``.

    Grey and RGB pictures (all that convscope draws) are encoded here: every row with PNG's
    "Up" filter (the difference from the row above, one numpy subtraction) and the whole image
    deflated by ``zlib`` at ``PNG_COMPRESS_LEVEL``. Pillow tries all five filters on every row
    and keeps the best; on a 680x680 patches figure that took 26 ms and gave 742 KB, "Up"
    alone 14 ms and 784 KB (6% larger), and both ``zlib`` and numpy release the GIL, so the
    writer threads encode in parallel. Other modes go through Pillow. Lossless either way.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"save_png expects a uint8 array, got {image.dtype}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"save_png expects an (H, W) or (H, W, 3) array, got shape {image.shape}")
        return _png_up_filtered(image)
    if image.mode in ("L", "RGB"):
        return _png_up_filtered(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_up_filtered(pixels: np.ndarray) -> bytes:
    """An 8-bit grey ``(H, W)`` or RGB ``(H, W, 3)`` array as PNG, every row "Up"-filtered."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else 3
    flat = np.ascontiguousarray(pixels).reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), np.uint8)
    rows[:, 0] = 2  # filter type "Up": each byte minus the byte above it, modulo 256
    rows[:1, 1:] = flat[:1]  # the first row's "above" is zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps, as PNG's does
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)) + _png_chunk(b"IEND", b""))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks (how manifests and run records
    vouch that a file is still the one convscope wrote)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def os_reason(exc: OSError) -> str:
    """An OSError as a lower-case clause for an error line (``permission denied``)."""
    return (exc.strerror or type(exc).__name__).lower()
