"""Process-wide CPU tuning and reduced-precision inference, both opt-in.

Two levers make CPU inference much faster without changing a single float32 result:

* **The allocator.** glibc's ``malloc`` hands every block above ``M_MMAP_THRESHOLD`` (128 KiB
  to 32 MiB, adapting) to ``mmap`` and gives freed memory back to the kernel above
  ``M_TRIM_THRESHOLD``. A CNN batch allocates and frees activations of tens of megabytes per
  layer, so every forward pass maps fresh pages and faults them in again: with default
  settings EfficientNet-Lite0 at batch 32 spends about as long in page faults as in
  arithmetic. Raising the thresholds (``mallopt``) keeps the pages in the heap, reused from one
  layer and batch to the next. This changes where memory comes from, never what is computed.
* **Memory layout.** Channels-last convolutions are faster for some architectures; that is a
  per-model fact measured once and recorded in the model's registry row
  (``ModelSpec.channels_last``), applied by ``load_model``.

``tune_cpu`` changes process-wide state, so the library never calls it on import: the CLI
calls it at startup (``--no-tune`` turns it off), and a library user calls it once. The methods
that run many large batches (Score-CAM, occlusion, Integrated Gradients, SmoothGrad, LRP, the
deletion/insertion and Quantus curves) run under ``allocator_tuned``, which applies the same
settings for the call only and then hands the allocator back to glibc's own thresholds.

``inference_precision`` runs the enclosed inference in bfloat16 autocast where the hardware
computes bfloat16 natively (AMX or AVX-512-BF16 on CPU, a CUDA device that supports it), and
in float32 elsewhere with a note saying so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from convscope.errors import BadArgument

if TYPE_CHECKING:
    import torch

# mallopt parameter numbers (glibc <malloc.h>) and the values tune_cpu sets.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
ALLOCATOR_SETTINGS: dict[str, tuple[int, int]] = {
    # Blocks below 1 GiB come from the heap, not from a fresh mmap per allocation.
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 1 << 30),
    # Freed memory stays in the process (up to 2 GiB of free top of heap).
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
    # The heap grows by at least 256 MiB at a time: one brk for several layers.
    "M_TOP_PAD": (M_TOP_PAD, 1 << 28),
}

PRECISIONS = ("float32", "bf16")
_PRECISION_ALIASES = {"float32": "float32", "fp32": "float32", "bf16": "bf16", "bfloat16": "bf16"}

_lock = threading.Lock()
_applied: dict[str, int] = {}  # what this process has already set through tune_cpu


@dataclass(frozen=True)
class TuneReport:
    """What ``tune_cpu`` did.

    Attributes:
        libc: the C library found (``"glibc 2.36"``), or what was found instead.
        changed: setting -> value set by *this* call (empty when already tuned or unsupported).
        active: every setting this process has applied so far, this call included.
        failed: settings the C library refused.
        note: one sentence for humans (``"allocator tuned"``, ``"already tuned"``, why not).
    """

    libc: str
    changed: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    failed: tuple[str, ...] = ()
    note: str = ""

    @property
    def tuned(self) -> bool:
        """True when the allocator settings are in force (by this call or an earlier one)."""
        return bool(self.active)


@functools.cache
def _glibc() -> tuple[ctypes.CDLL | None, str]:
    """The process's glibc and its version, or ``None`` and what the C library is instead (looked
    up once: ``find_library`` runs ``ldconfig``, and ``allocator_tuned`` asks on every call)."""
    if platform.system() != "Linux":
        return None, f"{platform.system() or 'unknown'} C library"
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        version_of = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        family, version = platform.libc_ver()
        return None, f"{family or 'non-glibc'} {version}".strip()
    version_of.restype = ctypes.c_char_p
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc, f"glibc {version_of().decode()}"


def tune_cpu() -> TuneReport:
    """Tune this process's memory allocator for large CPU batches (idempotent).

    Where the C library is glibc, raises ``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD`` and
    ``M_TOP_PAD`` through ``mallopt`` so activations reuse heap pages instead of mapping and
    faulting in fresh ones every layer. Elsewhere it changes nothing and says so. Results are
    bit-identical; only speed (and the process's resident memory, which stays at its peak)
    changes. The library never calls this on import; the CLI calls it at startup.

    Returns:
        a ``TuneReport``; a second call changes nothing and reports ``"already tuned"``.
    """
    with _lock:
        libc, described = _glibc()
        if libc is None:
            return TuneReport(libc=described, note=f"allocator not tuned: {described} is not glibc")
        changed: dict[str, int] = {}
        failed: list[str] = []
        for name, (parameter, value) in ALLOCATOR_SETTINGS.items():
            if _applied.get(name) == value:
                continue
            if libc.mallopt(parameter, value) == 1:
                changed[name] = value
                _applied[name] = value
            else:
                failed.append(name)
        if failed:
            note = "allocator partly tuned: glibc refused " + ", ".join(failed)
        elif changed:
            note = "allocator tuned: " + ", ".join(f"{k}={v}" for k, v in changed.items())
        else:
            note = "already tuned"
        return TuneReport(libc=described, changed=changed, active=dict(_applied), failed=tuple(failed), note=note)


# Where ``allocator_tuned`` leaves glibc after a call: the mmap threshold at the ceiling glibc's
# adaptive one reaches in a process that has run a CNN forward (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB
# on 64-bit) and the documented default top pad; the trim threshold at 2 GiB, so the heap a call
# grew stays for the next call instead of being faulted in again. Measured (Integrated Gradients,
# Lite0, 50 steps, fresh process, 2nd-4th calls; mallopt takes a C int, hence 2**31 - 1): trim 64 MiB (glibc's own ceiling) 0.85-0.95 s
# and 1.47-1.51 GB RSS after; 1 GiB 0.74-0.83 s; 2 GiB 0.68-0.70 s and 1.78-1.99 GB RSS after.
AFTER_CALL_SETTINGS: dict[str, tuple[int, int]] = {
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
    "M_TOP_PAD": (M_TOP_PAD, 128 << 10),
}
_call_depth = 0  # allocator_tuned blocks open in this process


@contextmanager
def allocator_tuned() -> Iterator[bool]:
    """Tune the allocator for the enclosed block only, for methods that run many large batches.

    In a process ``tune_cpu`` has already tuned (the CLI, or a user who called it), or whose
    allocator the environment configures (``MALLOC_*_`` variables, ``glibc.malloc`` tunables),
    this does nothing. Otherwise it applies the same settings on entry and, when the last open block
    exits, sets the mmap threshold and top pad to where glibc's own end up in a process that has
    run a CNN (32 MiB, 128 KiB): from then on blocks of 32 MiB and more are mapped and unmapped as
    glibc would. The heap the call grew is kept for the next call, up to 2 GiB (trim threshold):
    giving it back made every call fault its pages in again, 20% of an Integrated Gradients call
    on EfficientNet-Lite0 (``AFTER_CALL_SETTINGS``). glibc cannot say what its thresholds were,
    so a user's own ``mallopt`` values are not restored. Results are bit-identical; only speed
    changes.

    Yields:
        True when the block runs tuned (by this block or earlier), False where there is no glibc.
    """
    global _call_depth
    with _lock:
        libc, _ = _glibc()
        ours = libc is not None and not _applied and not _malloc_set_by_environment()
        if ours and _call_depth == 0:
            for parameter, value in ALLOCATOR_SETTINGS.values():
                libc.mallopt(parameter, value)  # type: ignore[union-attr]
        if ours:
            _call_depth += 1
    try:
        yield libc is not None
    finally:
        if ours:
            with _lock:
                _call_depth -= 1
                if _call_depth == 0 and not _applied:
                    for parameter, value in AFTER_CALL_SETTINGS.values():
                        libc.mallopt(parameter, value)  # type: ignore[union-attr]


def _malloc_set_by_environment() -> bool:
    """Whether the process was started with glibc malloc settings of its own (left alone)."""
    environ = os.environ
    return any(key.startswith("MALLOC_") and key.endswith("_") for key in environ) or (
        "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""))


def tuned_settings() -> dict[str, int]:
    """The allocator settings ``tune_cpu`` has applied in this process (empty: untuned)."""
    with _lock:
        return dict(_applied)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 matrix products in hardware, and why (not)."""
    import torch  # here, not at the top: the CLI tunes the allocator at start-up without loading torch

    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {torch.cuda.get_device_name(device)}"
        return False, "this CUDA device has no native bfloat16"
    if device.type != "cpu":
        return False, f"bfloat16 on {device.type} is not supported by convscope"
    flags = _cpu_flags()
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if native and torch.backends.mkldnn.is_available():
        return True, "CPU with " + " and ".join(native)
    return False, "this CPU has no AMX or AVX-512-BF16 (bfloat16 would be emulated, slower than float32)"


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``inference_precision`` settled on.

    Attributes:
        requested: the precision asked for (``"float32"`` or ``"bf16"``).
        used: the precision in force inside the block.
        note: why bf16 fell back to float32, or ``""``.
    """

    requested: str
    used: str
    note: str = ""


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> PrecisionChoice:
    """Check a ``--precision`` value and decide what ``device`` will run.

    Raises:
        BadArgument: an unknown precision.
    """
    key = _PRECISION_ALIASES.get(str(precision).strip().lower())
    if key is None:
        raise BadArgument(f"--precision {precision}", "is not a precision", "choose from: " + ", ".join(PRECISIONS))
    if key == "float32":
        return PrecisionChoice("float32", "float32")
    native, why = native_bf16(device)
    if native:
        return PrecisionChoice("bf16", "bf16")
    return PrecisionChoice("bf16", "float32", f"--precision bf16: {why}; running float32")


@contextmanager
def inference_precision(precision: str, device: str | torch.device = "cpu") -> Iterator[PrecisionChoice]:
    """Run the enclosed forward passes in ``precision`` (``"float32"`` or ``"bf16"``).

    bf16 is autocast: convolutions and matrix products compute in bfloat16 where the device
    does so natively, reductions such as softmax stay float32. Elsewhere the block runs in
    float32 and the yielded choice carries a note. Weights are not touched.

    Yields:
        the ``PrecisionChoice`` in force.
    """
    choice = resolve_precision(precision, device)
    if choice.used == "float32":
        yield choice
        return
    import torch

    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield choice
