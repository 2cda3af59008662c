"""Explanations that grade themselves: each attribution map's own faithfulness on its image.

A map claims "these pixels are why the network said *class*". The claim is testable on the very
image it explains (Petsiuk et al., RISE, BMVC 2018): delete the pixels in the map's order and the
class probability should fall fast (low deletion AUC); start from a blurred copy and put them
back, and it should rise fast (high insertion AUC). A map is only informative if it does better
than chance, so every grade comes with the same two numbers for a seeded random map (the coarse
7x7 noise of ``quality.random_map``, which deletes contiguous regions as a CAM does), and
``beats_random`` says whether the map wins on the two curves together: its insertion AUC minus
its deletion AUC (the "overall" score of several papers since RISE) is above the random map's.
Requiring a win on each curve separately would fail almost every gradient map: their scattered
pixels delete the class far faster than a random map does (deletion AUC 0.05 against 0.30 on the
bundled cat) but, put back on a blurred image, insert it a little slower than the random map's
coherent blobs. ``beats_random_deletion`` and ``beats_random_insertion`` keep the two verdicts.

The curves are ``analysis.quality.causal_curves`` with its RISE settings (deletion to the mean
colour, insertion from RISE's blur, softmax probability, trapezoid AUC over the fraction of
pixels in ``[0, 1]``, ties in raster order), with one difference: ``GRADE_STEPS`` (16) steps of
``ceil(H·W / 16)`` pixels instead of ``quality``'s 224, so a grade costs about 33 forwards
(one batch per curve) and fits the report's budget of two seconds per method. The AUCs are
therefore coarser than ``convscope quality``'s and not interchangeable with its numbers.

Which maps: every result that is an attribution over the image's pixels: the CAM family
(``CamMaps.maps``), the gradient maps (``GradientMaps.maps``: saliency, guided backprop, guided
Grad-CAM), occlusion (``OcclusionResult.pixel_drop``) and the relevance and path methods
(``Attributions.maps``: LRP, Integrated Gradients, SmoothGrad). Deconvnet projections, activations
and filters are not attributions for a class and get no grade. A map is graded by its value as
shown, highest first: for the signed maps (occlusion, LRP, IG, SmoothGrad) that is the evidence
*for* the class first, which is what deleting should remove; evidence against comes last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from convscope.analysis.quality import Protocol, causal_curves, random_map
from convscope.methods.occlusion.method import OcclusionResult
from convscope.methods.results import Attributions, CamMaps, GradientMaps
from convscope.types import LoadedModel

GRADE_STEPS = 16
RANDOM_SEED = 0
GRADED = (CamMaps, GradientMaps, Attributions, OcclusionResult)


@dataclass(frozen=True)
class Grade:
    """One map's faithfulness on its image, next to a random map's.

    Attributes:
        deletion_auc, insertion_auc: the map's AUCs (trapezoid over the fraction of pixels, in
            ``[0, 1]``; lower deletion and higher insertion are better).
        random_deletion_auc, random_insertion_auc: the seeded random map's, same image and class.
        target: the class explained.
        steps: curve steps (``GRADE_STEPS``), ``step_pixels`` pixels each.
        seed: the random map's seed.
        seconds: wall time of the grade (the random map's curves included when not cached).
    """

    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    target: int
    steps: int
    step_pixels: int
    seed: int
    seconds: float

    @property
    def beats_random_deletion(self) -> bool:
        return self.deletion_auc < self.random_deletion_auc

    @property
    def beats_random_insertion(self) -> bool:
        return self.insertion_auc > self.random_insertion_auc

    @property
    def score(self) -> float:
        """Insertion AUC minus deletion AUC (higher is better)."""
        return self.insertion_auc - self.deletion_auc

    @property
    def random_score(self) -> float:
        return self.random_insertion_auc - self.random_deletion_auc

    @property
    def beats_random(self) -> bool:
        """Better than the random map on the two curves together (``score`` above its)."""
        return self.score > self.random_score

    def as_dict(self) -> dict[str, Any]:
        return {
            "deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc,
            "random_deletion_auc": self.random_deletion_auc, "random_insertion_auc": self.random_insertion_auc,
            "score": self.score, "random_score": self.random_score,
            "beats_random": self.beats_random, "beats_random_deletion": self.beats_random_deletion,
            "beats_random_insertion": self.beats_random_insertion,
            "class": self.target, "steps": self.steps, "step_pixels": self.step_pixels, "random_seed": self.seed,
            "protocol": f"RISE deletion/insertion (convscope quality's), {self.steps} steps instead of 224",
            "seconds": self.seconds,
        }


# (image data pointer, shape, class, steps, seed) -> the random map's (deletion, insertion) AUCs
RandomCache = dict[tuple[Any, ...], tuple[float, float]]


def graded_map(result: Any, index: int = 0) -> tuple[torch.Tensor, int] | None:
    """The ``(H, W)`` attribution map of image ``index`` and its class, or ``None`` for a result
    that is not an attribution over the image's pixels."""
    if not isinstance(result, GRADED):
        return None
    maps = result.pixel_drop if isinstance(result, OcclusionResult) else result.maps
    return maps[index].detach().float().cpu(), int(result.targets[index])


def _aucs(loaded: LoadedModel, image: torch.Tensor, map_: torch.Tensor, target: int, protocol: Protocol) -> tuple[float, float]:
    deletion, insertion = causal_curves(loaded, image, map_[None], torch.tensor([target]), protocol,
                                        batch_size=2 * GRADE_STEPS)
    return float(deletion.auc[0]), float(insertion.auc[0])


def grade(
    loaded: LoadedModel, batch: torch.Tensor, result: Any, *, index: int = 0, steps: int = GRADE_STEPS,
    seed: int = RANDOM_SEED, cache: RandomCache | None = None,
) -> Grade | None:
    """Grade the attribution map of image ``index`` of ``result`` on ``batch[index]``.

    Args:
        loaded: the model the map explains.
        batch: the normalised ``(N, C, H, W)`` batch the method ran on.
        result: a method's result; ``None`` is returned for one that is not an attribution map.
        steps: deletion/insertion steps.
        seed: the random map's seed.
        cache: the random map's AUCs per image and class, filled and reused across calls (the
            report grades several maps of one image for the same class).

    Returns:
        ``Grade`` or ``None``; also ``None`` when the map's size is not the input's.
    """
    found = graded_map(result, index)
    if found is None:
        return None
    map_, target = found
    image = batch[index:index + 1].detach()
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if tuple(map_.shape) != (height, width):
        return None
    started = time.perf_counter()
    protocol = Protocol(step=math.ceil(height * width / steps))
    key = (image.data_ptr(), tuple(image.shape), target, steps, seed)
    if cache is not None and key in cache:
        random_aucs = cache[key]
    else:
        noise = random_map(loaded, image, torch.tensor([target]), None, seed)[0]
        random_aucs = _aucs(loaded, image, noise, target, protocol)
        if cache is not None:
            cache[key] = random_aucs
    deletion_auc, insertion_auc = _aucs(loaded, image, map_, target, protocol)
    return Grade(deletion_auc=deletion_auc, insertion_auc=insertion_auc, random_deletion_auc=random_aucs[0],
                 random_insertion_auc=random_aucs[1], target=target, steps=math.ceil(height * width / protocol.step),
                 step_pixels=protocol.step, seed=seed, seconds=time.perf_counter() - started)
