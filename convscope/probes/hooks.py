"""Forward-hook capture and mode switching, always undone in ``finally``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass
class Capture(Generic[T]):
    """Outputs recorded during the ``with`` block.

    Attributes:
        outputs: layer name -> one record per call of that module (reused modules such as
            ResNet's block ReLU are called more than once per forward): the output tensor for
            ``capture``, the reduction's result for ``reduce_outputs``.
    """

    outputs: dict[str, list[T]] = field(default_factory=dict)

    def last(self, name: str) -> T:
        """The output of the most recent call of ``name``."""
        calls = self.outputs.get(name)
        if not calls:
            raise RuntimeError(f"layer {name!r} was not called during the forward pass")
        return calls[-1]

    def clear(self) -> None:
        for calls in self.outputs.values():
            calls.clear()


@contextmanager
def capture(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    *,
    mode: str = "clone",
) -> Iterator[Capture[torch.Tensor]]:
    """Record the outputs of ``layers`` for every forward pass inside the block.

    Args:
        model: the network; every module in ``layers`` must be one of its submodules (a
            module of another network would never fire, and the method would blame the layer).
        layers: display name -> module.
        mode: ``"clone"`` stores a detached copy (safe against later in-place ops such as
            torchvision's ``ReLU(inplace=True)``); ``"graph"`` stores the module's real
            output, still in the autograd graph, and hands the rest of the network a copy,
            so in-place ops downstream cannot overwrite what we keep and
            ``torch.autograd.grad(score, stored)`` gives the gradient at this layer.

    Yields:
        a ``Capture`` whose lists fill as the model runs.
    """
    if mode not in ("clone", "graph"):
        raise ValueError(f"mode must be 'clone' or 'graph', not {mode!r}")
    store: Capture[torch.Tensor] = Capture({name: [] for name in layers})

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: object, output: object) -> object:
            if not isinstance(output, torch.Tensor):
                return None
            if mode == "clone":
                store.outputs[name].append(output.detach().clone())
                return None
            store.outputs[name].append(output)
            return output.clone()

        return hook

    with _hooked(model, layers, make_hook, "capture"):
        yield store


@contextmanager
def _hooked(
    model: nn.Module, layers: Mapping[str, nn.Module], make_hook: Callable[[str], Any], who: str
) -> Iterator[None]:
    """``make_hook(name)`` registered as a forward hook on each of ``layers`` for the block, and
    removed in ``finally``. Every module must be one of ``model``'s: a module of another network
    would never fire, and the method would blame the layer."""
    members = {id(m) for m in model.modules()}
    strangers = [name for name, module in layers.items() if id(module) not in members]
    if strangers:
        raise ValueError(f"{who}: {', '.join(strangers)} not part of the model")
    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def reduce_outputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    reduce: Callable[[str, torch.Tensor], Any],
) -> Iterator[Capture[Any]]:
    """Record ``reduce(name, output)`` of ``layers`` for every forward pass inside the block.

    The reduction runs inside the hook, on the module's own output (detached), before anything
    downstream runs: an in-place op later in the network cannot change what it sees, so no copy
    of the output is needed. For passes that keep a summary (the dataset miner keeps each map's
    maximum) this saves ``capture``'s copy of every map. ``reduce`` must not modify its input.

    Yields:
        a ``Capture`` of the results, one per call of each module (``clear()`` it between passes).
    """
    store: Capture[Any] = Capture({name: [] for name in layers})

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                store.outputs[name].append(reduce(name, output.detach()))

        return hook

    with _hooked(model, layers, make_hook, "reduce_outputs"):
        yield store


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
