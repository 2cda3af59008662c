"""The learning-rate schedule: the rate at every optimizer step of a run.

It is a function of the global step and the run's total steps (``epochs`` times the steps per
epoch), set before every step. So resuming with a larger ``epochs`` re-plans it: every remaining
step gets the rate a run started with that ``epochs`` has at that step (for a finished ``onecycle``
or ``cosine`` run, a warm restart that decays to the floor by the new last epoch).
"""

from __future__ import annotations

import math

from convscope.training.config import TrainConfig


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate at a global step (0-based) of ``total``.

    ``onecycle`` rises from ``lr / 25`` to ``lr`` over the first ``warmup`` of the steps (half a
    cosine), then falls to ``lr * 1e-4`` at the last step (half a cosine); ``cosine`` only falls;
    ``constant`` stays at ``lr``.
    """
    peak = float(config.lr)  # type: ignore[arg-type]
    if config.schedule == "constant" or total <= 1:
        return peak
    floor = peak * 1e-4
    if config.schedule == "cosine":
        t = step / (total - 1)
        return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2
    warm = int(total * config.warmup)
    start = peak / 25.0
    if step < warm:
        t = step / warm
        return start + (peak - start) * (1 - math.cos(math.pi * t)) / 2
    t = (step - warm) / max(1, total - 1 - warm)
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2

