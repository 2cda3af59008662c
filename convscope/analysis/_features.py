"""Flattened layer outputs and class probabilities of a batch, in one forward pass per chunk.

A layer is an alias or module path, or ``"classifier_input"``: the input of the network's last
``nn.Linear`` (the paper's "layer 7" feature vector for AlexNet/ZFNet, the pooled 1280-vector
for EfficientNet), recorded with a forward pre-hook that is removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from convscope.errors import UnknownLayer
from convscope.probes.hooks import capture, eval_mode
from convscope.probes.layers import layout_of, resolve_layer
from convscope.types import LoadedModel

CLASSIFIER_INPUT = "classifier_input"


def default_layers(loaded: LoadedModel, top: str = CLASSIFIER_INPUT) -> list[str]:
    """The first conv stage and ``top`` (by default the last feature vector before the classifier)."""
    first = next(iter(loaded.stages), "") or loaded.first_conv
    if not first:
        raise UnknownLayer(loaded.name, "has no conv stages", "name the layers with layers=/--layers")
    return [first, top] if first != top else [first]


def last_linear(module: nn.Module, model_name: str) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnknownLayer(CLASSIFIER_INPUT, f"{model_name} has no nn.Linear classifier",
                           "name a layer with layers=/--layers")
    return linears[-1]


@contextmanager
def _classifier_input(module: nn.Module, model_name: str) -> Iterator[list[torch.Tensor]]:
    store: list[torch.Tensor] = []

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        store.append(inputs[0].detach().clone())

    handle = last_linear(module, model_name).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def forward_features(
    loaded: LoadedModel, batch: torch.Tensor, layers: Sequence[str], *, batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``batch`` in chunks; return ``(probabilities (N, K) float32, {layer: (N, D) float32})``
    on the CPU, each feature row the flattened layer output of one image."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    resolved = {name: resolve_layer(loaded, name) for name in layers if name != CLASSIFIER_INPUT}
    named = {name: module for name, (_, module) in resolved.items()}
    # Maps are read channels-first whatever their layout (NHWC, tokens), so a feature row has
    # the same order as on a CNN; vectors and other outputs are flattened as they are.
    measured = {name: layout_of(loaded, path, batch.shape[1:]) for name, (path, _) in resolved.items()}
    layouts = {name: layout for name, layout in measured.items() if layout.spatial}
    probabilities: list[torch.Tensor] = []
    features: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    net = loaded.module
    with eval_mode(net), torch.inference_mode(), capture(net, named, layouts=layouts) as store:
        pre = _classifier_input(net, loaded.name) if CLASSIFIER_INPUT in layers else None
        with pre if pre is not None else _nothing() as inputs:
            for part in torch.split(batch.to(device=loaded.device, dtype=loaded.dtype), batch_size):
                store.clear()
                if inputs is not None:
                    inputs.clear()
                probabilities.append(torch.softmax(net(part).float(), dim=1).cpu())
                for name in layers:
                    if name == CLASSIFIER_INPUT:
                        assert inputs is not None
                        output = inputs[-1]
                    else:
                        calls = store.outputs[name]
                        if not calls:
                            raise UnknownLayer(name, "did not run during the forward pass")
                        output = calls[-1]
                    features[name].append(output.flatten(1).float().cpu())
                if progress is not None:
                    progress(len(part))
    return torch.cat(probabilities), {name: torch.cat(rows) for name, rows in features.items()}


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
