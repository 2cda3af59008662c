"""Forward-hook capture, call tracing, early stops and mode switching, always undone in ``finally``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class StopForward(BaseException):
    """Raised by a hook to end a forward pass once what the caller needs has been computed.

    A ``BaseException``, so a model's own ``except Exception`` cannot swallow it; the caller
    that set the hook catches it around the forward call (``stop_after``)."""


@contextmanager
def stop_after(module: nn.Module, when: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Inside the block, end every forward pass (``StopForward``) when ``module`` returns and
    ``when()`` is true; the hook is removed on exit. A hook registered after the caller's own on
    the same module runs after them, so their records of this call are complete."""

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if when():
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
    layouts: Mapping[str, Any] | None = None,
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
        layouts: display name -> measured ``Layout`` (``probes/layout.py``): that layer's
            output is stored as its ``(N, C, h, w)`` view (NHWC permuted, tokens on their grid),
            still in the graph in ``"graph"`` mode. Names without one are stored as they are.

    Yields:
        a ``Capture`` whose lists fill as the model runs.
    """
    if mode not in ("clone", "graph"):
        raise ValueError(f"mode must be 'clone' or 'graph', not {mode!r}")
    store: Capture[torch.Tensor] = Capture({name: [] for name in layers})
    views = _views(layers, layouts)
    found = layouts or {}

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        view = views[name]
        layout = found.get(name)

        def hook(module: nn.Module, inputs: object, output: object) -> object:
            if not isinstance(output, torch.Tensor):
                return None
            if mode == "clone":
                store.outputs[name].append(view(output.detach()).clone())
                return None
            stored = view(output)
            store.outputs[name].append(stored)
            if layout is None or stored is output:
                return output.clone()
            # The rest of the network reads a copy rebuilt from the stored view, so the score's
            # gradient flows through the view (a sibling of the score's path would get none).
            return layout.from_nchw(stored, output)

        return hook

    with _hooked(model, layers, make_hook, "capture"):
        yield store


def _views(
    layers: Mapping[str, nn.Module], layouts: Mapping[str, Any] | None
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Per layer, the function from its output to what is stored (its NCHW view, or itself)."""

    def same(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def converter(layout: Any, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda tensor: layout.to_nchw(tensor, name)

    found = layouts or {}
    return {
        name: converter(layout, name) if (layout := found.get(name)) is not None and layout.kind != "NCHW" else same
        for name in layers
    }


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
    layouts: Mapping[str, Any] | None = None,
) -> Iterator[Capture[Any]]:
    """Record ``reduce(name, output)`` of ``layers`` for every forward pass inside the block.

    The reduction runs inside the hook, on the module's own output (detached), before anything
    downstream runs: an in-place op later in the network cannot change what it sees, so no copy
    of the output is needed. For passes that keep a summary (the dataset miner keeps each map's
    maximum) this saves ``capture``'s copy of every map. ``reduce`` must not modify its input.
    ``layouts`` as for ``capture``: the reduction sees each layer's ``(N, C, h, w)`` view.

    Yields:
        a ``Capture`` of the results, one per call of each module (``clear()`` it between passes).
    """
    store: Capture[Any] = Capture({name: [] for name in layers})
    views = _views(layers, layouts)

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        view = views[name]

        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                store.outputs[name].append(reduce(name, view(output.detach())))

        return hook

    with _hooked(model, layers, make_hook, "reduce_outputs"):
        yield store


@dataclass(eq=False)
class ModuleCall:
    """One call of a module seen by ``trace_calls``.

    Attributes:
        module, path: the module and its dotted ``named_modules`` path (``""`` for the model
            itself, ``"?"`` for a module that is not one of the model's).
        input: the first positional argument when it is a tensor (the tensor itself, not a copy),
            else ``None``; ``input_version`` its version counter at the call (-1 without one,
            as for inference tensors), ``input_shape`` its shape.
        parent, children: the traced calls around and inside this one, in call order.
        output: what the module returned (not a copy); ``output_version`` and ``output_shape``
            the version counter and shape of a tensor output when the call returned.
    """

    module: nn.Module
    path: str
    input: torch.Tensor | None
    input_version: int
    input_shape: tuple[int, ...] | None
    parent: ModuleCall | None
    children: list[ModuleCall] = field(default_factory=list)
    output: object = None
    output_version: int = -1
    output_shape: tuple[int, ...] | None = None


@dataclass
class CallTrace:
    """The calls recorded by ``trace_calls``: ``roots`` (the outermost calls, each with its tree
    of ``children``) and ``calls`` (every call, in the order it returned)."""

    roots: list[ModuleCall] = field(default_factory=list)
    calls: list[ModuleCall] = field(default_factory=list)


def _version(tensor: torch.Tensor | None) -> int:
    return -1 if tensor is None or tensor.is_inference() else tensor._version


@contextmanager
def trace_calls(
    model: nn.Module,
    *,
    leaves_only: bool = False,
    keep_tensors: bool = True,
    on_call: Callable[[ModuleCall], None] | None = None,
    on_return: Callable[[ModuleCall], None] | None = None,
) -> Iterator[CallTrace]:
    """Record every call of every module of ``model`` (or of its leaves) inside the block.

    The tensors are the modules' own, not copies, with their version counters: a consumer can
    follow a tensor from the call that returned it to the calls that read it, and an in-place
    change in between (``out += identity``) shows as a new version. Every call is recorded,
    so a reused module (ResNet's block ReLU) appears once per call.

    Args:
        leaves_only: trace only modules without children (the tree is then flat).
        keep_tensors: ``False`` drops each call's input and output once ``on_return`` has
            seen them (shapes stay): the trace then holds no activations.
        on_call, on_return: called with the ``ModuleCall`` as the module starts (its input
            known) and as it returns (its output known).

    Yields:
        a ``CallTrace`` that fills as the model runs.
    """
    paths = {module: path for path, module in model.named_modules()}
    traced = CallTrace()
    stack: list[ModuleCall] = []

    def pre_hook(module: nn.Module, inputs: tuple[object, ...]) -> None:
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        parent = stack[-1] if stack else None
        call = ModuleCall(module, paths.get(module, "?"), first, _version(first),
                          tuple(first.shape) if first is not None else None, parent)
        (parent.children if parent is not None else traced.roots).append(call)
        stack.append(call)
        if on_call is not None:
            on_call(call)

    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        call = stack.pop()
        call.output = output
        if isinstance(output, torch.Tensor):
            call.output_version, call.output_shape = _version(output), tuple(output.shape)
        if on_return is not None:
            on_return(call)
        if not keep_tensors:
            call.input = call.output = None
        traced.calls.append(call)

    handles = []
    try:
        for module in model.modules():
            if leaves_only and next(module.children(), None) is not None:
                continue
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        yield traced
    finally:
        for handle in handles:
            handle.remove()


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
