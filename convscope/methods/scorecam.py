"""Score-CAM (Wang et al., CVPR Workshops 2020): channel weights from masked forward passes.

Each channel of the layer, upsampled to the input and min-max scaled to ``[0, 1]``, masks the
input (``x * mask``); the channel's weight is the softmax, over channels, of the target's logit
on that masked copy. No gradient is taken. The map is the ReLU of the weighted channel sum,
post-processed like :func:`convscope.methods.gradcam.gradcam`.

Masks follow pytorch-grad-cam's ``ScoreCAM`` exactly (bilinear upsampling with
``align_corners=True``, ``(a - min) / (max - min + 1e-8)``), so the maps agree with it. The work
is one forward per channel, and that is where the time goes; three things make it cheaper
without changing a number:

* an all-zero channel (a dead ReLU) gives an all-zero mask, and every all-zero mask gives the
  same masked input (zeros), so it is run once and its logit shared;
* the masked copies run through the network in channels-last layout, with no host
  synchronisation until the end (the peer calls ``.item()`` per copy);
* masks are built chunk by chunk, so memory stays at ``batch_size`` input copies;
* the masked copies run through a copy of the network with BatchNorm folded into the
  convolutions (``convscope.probes.fold``): one pass over each map instead of two;
* the call runs with the allocator tuned (``convscope.runtime.allocator_tuned``): without it,
  glibc maps and faults in fresh pages for every layer of every batch, which took two thirds
  of the time on EfficientNet-Lite0 (192 masked copies: 1.99 s untuned, 0.66 s tuned).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from convscope.methods._common import ModelLike, prepare
from convscope.methods.gradcam import _default_layer, cam_from_weights, feature_map_of
from convscope.methods.results import CamMaps
from convscope.methods.targets import TargetLike, resolve_targets
from convscope.probes.fold import fold_batchnorm
from convscope.probes.hooks import capture, eval_mode
from convscope.probes.layers import map_layer
from convscope.probes.mixed import bf16_plan
from convscope.runtime import allocator_tuned


def _masks(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(K, h, w)`` activations -> ``(K, H, W)`` masks in ``[0, 1]`` (pytorch-grad-cam's recipe)."""
    up = F.interpolate(activations[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    flat = up.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    return (up - low) / (high - low + 1e-8)


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def scorecam(
    model: ModelLike,
    images: Any,
    target: TargetLike = None,
    layer: str | None = None,
    *,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CamMaps:
    """Score-CAM maps: each channel weighted by the class score of the input masked with it.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` returning ``(N, classes)`` scores.
        images: PIL image(s) or a normalised ``(N, C, H, W)`` tensor.
        target: ``None`` (each image's top-1 class), a class index or label, or one per image.
        layer: alias or module path; default: the model's ``cam_layer``.
        batch_size: masked copies per forward pass; default 16 on CPU (measured on
            EfficientNet-Lite0 at 192 channels, allocator tuned: 16 and 32 within 5%, 64 20%
            slower, as cache reuse falls) and 64 on other devices.
        progress: called with the number of masked copies finished after each forward pass.

    Returns:
        ``CamMaps`` (``method="scorecam"``) with ``maps`` ``(N, H, W)`` float32 in ``[0, 1]``;
        ``weights`` ``(N, C)`` are the softmax over channels of the masked-copy logits.

    Raises:
        UnknownLayer: no such layer, or its output is not an ``(N, C, h, w)`` feature map.
        BadTarget: unknown class index or label.
        ValueError: ``batch_size`` below 1.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded, batch = prepare(model, images)
    if batch_size is None:
        batch_size = 16 if batch.device.type == "cpu" else 64
    name = _default_layer(loaded, layer, batch.shape[1:])
    found = map_layer(loaded, name, batch.shape[1:])
    size = (int(batch.shape[-2]), int(batch.shape[-1]))
    net = loaded.module
    with eval_mode(net), torch.inference_mode():
        # The clean pass stays float32 under --precision bf16 (autocast): the activations are both
        # the masks and the map's terms, so only the masked copies' scores run in bfloat16
        # (the map's correlation with float32's: 0.9977 with this pass in bfloat16 too).
        with capture(net, {found.path: found.module}, layouts={found.path: found.layout}) as store, \
                torch.autocast(batch.device.type, enabled=False):
            logits = net(batch)
        activations = feature_map_of(store, found.path, name).float()
        targets = resolve_targets(target, logits, loaded.categories, loaded.name)
        count, channels = activations.shape[:2]
        # The masked copies only need logits: they run through the copy with BatchNorm folded
        # into the convolutions (``probes.fold``; logits within 1e-6 of the network's).
        fast = fold_batchnorm(net, batch[:1]).module
        if torch.is_autocast_enabled(batch.device.type):  # --precision bf16: some layers stay float32
            fast = bf16_plan(fast, batch[:1])
        masked_logits = torch.empty(count, channels, dtype=torch.float32, device=batch.device)
        for i in range(count):
            masked_logits[i] = _channel_scores(
                fast, batch[i], activations[i], int(targets[i]), size, batch_size, progress
            )
    weights = torch.softmax(masked_logits, dim=1)
    scores = logits.gather(1, targets[:, None])[:, 0]
    return cam_from_weights("scorecam", name, loaded, activations, weights, size, targets, scores)


def _channel_scores(
    net: torch.nn.Module, image: torch.Tensor, activations: torch.Tensor, target: int,
    size: tuple[int, int], batch_size: int, progress: Callable[[int], None] | None,
) -> torch.Tensor:
    """``(C,)`` target logit of the image masked by each channel's mask."""
    channels = activations.shape[0]
    flat = activations.flatten(1)
    # An all-zero channel (a dead ReLU) upsamples to exactly zero and gives an all-zero mask;
    # one forward serves them all. A constant non-zero channel is left to the general path: its
    # upsampled copy may differ by an ulp, which the peer's min-max turns into a mask.
    constant = (flat.amax(dim=1) == 0) & (flat.amin(dim=1) == 0)
    live = torch.nonzero(~constant).flatten()
    scores = torch.empty(channels, dtype=torch.float32, device=image.device)
    if bool(constant.any()):
        zero = torch.zeros_like(image)[None].contiguous(memory_format=torch.channels_last)
        scores[constant] = net(zero)[0, target].float()
        if progress is not None:
            progress(int(constant.sum()))
    for start in range(0, len(live), batch_size):
        index = live[start:start + batch_size]
        masks = _masks(activations[index], size).to(image.dtype)
        copies = (image[None] * masks[:, None]).contiguous(memory_format=torch.channels_last)
        scores[index] = net(copies)[:, target].float()
        if progress is not None:
            progress(len(index))
    return scores
