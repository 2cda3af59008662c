"""Convolution kernels, normalised per filter for display."""

from __future__ import annotations

from torch import nn

from convscope.errors import UnknownLayer
from convscope.methods._common import ModelLike
from convscope.models.load import as_loaded
from convscope.probes.layers import resolve_layer
from convscope.types import Filters


def conv_filters(model: ModelLike, *, layer: str | None = None) -> Filters:
    """Kernels of a convolution (default: the model's first one).

    Returns:
        ``Filters``: raw ``(out, in, kh, kw)`` weights, the same min-max scaled to ``[0, 1]``
        per output filter, and each filter's strongest input channel.
    """
    loaded = as_loaded(model)
    name = layer or loaded.first_conv
    if not name:
        raise UnknownLayer(loaded.name, "has no convolution", "name one with --layer")
    path, module = resolve_layer(loaded, name)
    if not isinstance(module, nn.Conv2d) and name in loaded.stages:
        path, module = stage_conv(loaded.module, path)
    if not isinstance(module, nn.Conv2d):
        raise UnknownLayer(name, f"is a {type(module).__name__}, not a Conv2d", "pick a convolution (see 'convscope layers')")
    weights = module.weight.detach().float().cpu()
    flat = weights.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    normalized = (weights - low) / (high - low).clamp_min(1e-12)
    strongest = weights.flatten(2).norm(dim=2).argmax(dim=1)
    return Filters(layer=path, weights=weights, normalized=normalized, strongest_input=strongest)



def stage_conv(module: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The convolution that makes a stage's output: the last ``Conv2d`` registered up to the
    end of ``path``'s subtree (a stage alias names the activation after it, ``conv2`` ->
    ``features.4`` ReLU -> ``features.3`` conv; or a block holding several convolutions)."""
    named = list(module.named_modules())
    end = max(i for i, (name, _) in enumerate(named) if name == path or name.startswith(path + "."))
    convs = [(name, child) for name, child in named[: end + 1] if isinstance(child, nn.Conv2d)]
    if not convs:
        raise UnknownLayer(path, "has no convolution before it", "pick a convolution (see 'convscope layers')")
    return convs[-1]
