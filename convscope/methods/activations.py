"""Activation maps (channel means over the image) and feature-map stacks of chosen layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from convscope.errors import BadArgument, UnknownLayer
from convscope.methods._common import ModelLike, prepare
from convscope.probes.hooks import capture, eval_mode
from convscope.probes.layers import alias_of, default_stages, map_layer
from convscope.types import ActivationMaps, FeatureMaps
from convscope.validate import layer_names


def normalize_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``(H, W)`` map of an ``(N, H, W)`` stack to ``[0, 1]`` (flat maps -> 0)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    span = high - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def _spatial(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() != 4:
        raise UnknownLayer(
            name, f"has output shape {tuple(tensor.shape)}, not a (N, C, H, W) feature map",
            "pick a convolutional layer (see 'convscope layers')",
        )
    return tensor


def activation_maps(
    model: ModelLike, images: Any, *, layers: str | Sequence[str] | None = None
) -> ActivationMaps:
    """Channel-mean of the rectified output of each layer, upsampled onto the input.

    All layers are captured in one forward pass.

    Args:
        layers: names or aliases, or one name (``"conv1"`` is one layer); default (``None``
            or empty): the model's conv stages.

    Returns:
        ``ActivationMaps`` with ``(N, H, W)`` maps in ``[0, 1]`` at input resolution.
    """
    loaded, batch = prepare(model, images)
    stages = default_stages(loaded, batch.shape[1:])
    # The model's own aliases, or (measured just now, for a model wrapped unmeasured) the paths.
    names = layer_names(layers) or (list(stages) if stages == loaded.stages else list(stages.values()))
    if not names:
        raise UnknownLayer(loaded.name, "has no conv stages to show", "name layers explicitly")
    modules = {}
    layouts = {}
    for name in names:
        found = map_layer(loaded, name, batch.shape[1:])
        key = alias_of(loaded, found.path) if name == found.path else name
        modules[key], layouts[key] = found.module, found.layout
    height, width = batch.shape[-2:]
    raw: dict[str, torch.Tensor] = {}
    maps: dict[str, torch.Tensor] = {}
    with eval_mode(loaded.module), torch.inference_mode(), capture(loaded.module, modules, layouts=layouts) as store:
        loaded.module(batch)
        for name in modules:
            # "The ReLU output": rectify, so layers whose output is not already post-ReLU
            # (linear bottlenecks, pre-activation picks) show positive evidence only.
            mean = _spatial(name, store.last(name)).float().clamp_min(0).mean(dim=1)
            raw[name] = mean.cpu()
            up = F.interpolate(mean[:, None], size=(height, width), mode="bilinear", align_corners=False)
            maps[name] = normalize_per_image(up[:, 0]).cpu()
    return ActivationMaps(layers=tuple(modules), maps=maps, raw=raw, preprocess=loaded.preprocess)


def feature_maps(
    model: ModelLike,
    images: Any,
    *,
    layer: str,
    max_channels: int = 64,
    order: str = "index",
) -> FeatureMaps:
    """The channels of one layer.

    Args:
        max_channels: how many channels to keep.
        order: ``"index"`` (the first channels) or ``"activation"`` (the most active channels,
            by mean activation over the batch).

    Returns:
        ``FeatureMaps`` with ``(N, K, h, w)`` raw activations.
    """
    if order not in ("index", "activation"):
        raise BadArgument("--order", f"must be 'index' or 'activation', not {order!r}")
    if max_channels < 1:
        raise BadArgument("--max", f"must be at least 1, got {max_channels}")
    loaded, batch = prepare(model, images)
    found = map_layer(loaded, layer, batch.shape[1:])
    with (eval_mode(loaded.module), torch.inference_mode(),
          capture(loaded.module, {layer: found.module}, layouts={layer: found.layout}) as store):
        loaded.module(batch)
        output = _spatial(layer, store.last(layer)).float()
    strength_all = output.mean(dim=(2, 3))  # (N, C)
    count = min(max_channels, output.shape[1])
    if order == "index":
        channels = torch.arange(count, device=output.device)
    else:
        channels = strength_all.mean(dim=0).topk(count).indices
    return FeatureMaps(
        layer=layer,
        channels=channels.cpu(),
        maps=output[:, channels].cpu(),
        strength=strength_all[:, channels].cpu(),
    )




def strongest_units(
    model: ModelLike, images: Any, *, layer: str, units: Sequence[int], count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The ``count`` of ``units`` that fire most on one image, by the channel's maximum over its map
    (the score the dataset miner ranks patches by; ties: the lower unit), strongest first.

    Returns:
        ``(chosen, values, heat, channels)``: the unit ids ``(K,)``, their maxima ``(K,)``, their
        maps rectified, upsampled to the input and min-max scaled ``(K, H, W)`` in ``[0, 1]``
        (as ``activation_maps`` draws a layer), and the layer's channel count.

    Raises:
        BadArgument: a unit beyond the layer's channels, or no units.
    """
    if not units:
        raise BadArgument("units", "give at least one unit")
    loaded, batch = prepare(model, images)
    maps = feature_maps(loaded, batch[:1], layer=layer, max_channels=2**31, order="index").maps[0]
    ordered = sorted({int(u) for u in units})
    if ordered[0] < 0 or ordered[-1] >= maps.shape[0]:
        raise BadArgument(f"unit {ordered[-1]}", f"is out of range: layer {layer} has {maps.shape[0]} channels")
    values = maps[ordered].amax(dim=(1, 2))
    order = sorted(range(len(ordered)), key=lambda k: (-float(values[k]), ordered[k]))[:count]
    chosen = torch.tensor([ordered[k] for k in order], dtype=torch.long)
    height, width = batch.shape[-2:]
    heat = F.interpolate(maps[chosen][:, None].clamp_min(0), size=(height, width), mode="bilinear",
                         align_corners=False)[:, 0]
    return chosen, values[order], normalize_per_image(heat), int(maps.shape[0])
