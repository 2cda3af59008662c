"""The precision probe of approximate mode: half precision only where it is native and pays.

``mode="approximate"`` computes the occluded copies on a bfloat16 (CUDA without bfloat16:
float16) copy of the model. It is kept only when the device computes that precision natively
(``low_precision``) and a short timing of both precisions on this model and machine shows it
faster by at least ``APPROXIMATE_MIN_SPEEDUP`` (``speedup``); otherwise the run is exact and
the reason is returned, for ``OcclusionStats.fallback``.
"""

from __future__ import annotations

import copy
import time

import torch

from convscope.probes.hooks import eval_mode

# Approximate mode keeps half precision only when a short probe shows it pays: a forward of
# this many copies in each precision (best of two), before any occluded copy runs.
APPROXIMATE_PROBE_COPIES = 4
APPROXIMATE_MIN_SPEEDUP = 1.15


def approximate_twin(
    module: torch.nn.Module, batch: torch.Tensor, batch_size: int
) -> tuple[torch.nn.Module | None, torch.dtype | None, str]:
    """A half-precision copy of ``module`` for approximate mode, if it pays here.

    Returns:
        ``(twin, dtype, "")`` (the caller's model is untouched), or ``(None, None, reason)``
        to run exact.
    """
    low = low_precision(batch.device)
    if low is None:
        return None, None, f"{batch.device.type} has no fast bfloat16/float16 arithmetic: ran exact (float32)"
    twin = copy.deepcopy(module).to(low)
    with eval_mode(module), eval_mode(twin), torch.no_grad():
        ratio = speedup(module, twin, batch[:1], low, min(batch_size, APPROXIMATE_PROBE_COPIES))
    if ratio < APPROXIMATE_MIN_SPEEDUP:
        return None, None, (f"{str(low).removeprefix('torch.')} measured {ratio:.2f}x the float32 speed on this model "
                            f"and machine (needs {APPROXIMATE_MIN_SPEEDUP:g}x): ran exact (float32)")
    return twin, low, ""


def speedup(module: torch.nn.Module, twin: torch.nn.Module, image: torch.Tensor, low: torch.dtype, copies: int) -> float:
    """float32 time / ``low`` time of one forward of ``copies`` copies of ``image`` (best of two
    each; the first calls also warm up the kernels). Small networks and CPUs whose bfloat16 is
    emulated come out below 1."""
    full = image.expand(copies, *image.shape[1:]).contiguous()
    half = full.to(low)

    def best(network: torch.nn.Module, x: torch.Tensor) -> float:
        network(x)  # warm-up: first calls pick kernels and allocate
        times = []
        for _ in range(2):
            start = time.perf_counter()
            network(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(module, full) / max(best(twin, half), 1e-9)


def low_precision(device: torch.device) -> torch.dtype | None:
    """bfloat16 where this device computes it natively (else ``None``: stay exact)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):  # private probe; absent in some builds
            return None
    return None
