"""Architecture variants (Zeiler & Fergus Table 3): module surgery on a built model.

It lives beside the models, not in ``training``, because ``load_model`` rebuilds a trained variant from
the ``variant`` recorded in its checkpoint; the ablation study itself is ``convscope.training.ablation``.

A variant is one or more operations separated by ``;``::

    drop:conv3,conv4              remove conv stages 3 and 4
    width:conv2=512               give conv2 512 output channels
    drop:classifier.1             remove a fully connected layer
    drop:conv4;width:conv5=32     both

Layers are named by the model's aliases (``conv1``..``conv5``) or by module path; only
``Conv2d`` and ``Linear`` layers can be dropped or resized.

Semantics, precisely:

* ``drop`` replaces the layer, its normalisation (a ``BatchNorm`` directly after it) and its
  activation (the first ReLU-like module after it, before the next conv/linear) with
  ``nn.Identity``; pooling stays. When the dropped layer changed the channel (feature) count, the
  next ``Conv2d``/``Linear`` is rebuilt, freshly initialised, to take the dropped layer's input
  channels. The network's output layer cannot be dropped.
* ``width`` rebuilds the layer with the new number of output channels (features), its
  ``BatchNorm`` with the new size, and the next ``Conv2d``/``Linear`` with matching input; a
  following ``Linear`` that reads a flattened ``C x h x w`` map keeps its ``h x w``.
* Every rebuilt layer keeps kernel size, stride, padding, dilation, groups (1) and bias, and is
  initialised by PyTorch's defaults from the global RNG (seeded by the training run).
* After surgery the variant must run on the model's input size; if it does not (a dropped stride
  changed a shape a fixed-size layer needs), ``BadArgument`` names the variant and the error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from convscope.errors import BadArgument, close_matches
from convscope.models.stages import ACTIVATIONS
from convscope.parsing import parse_int, shown

_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)
BASE = "base"
# Widest layer a variant may ask for, checked before anything is allocated (a 3x3 conv this wide
# on 512 input channels is 300 M parameters).
MAX_WIDTH = 1 << 16


@dataclass(frozen=True)
class Operation:
    """One surgery step: ``kind`` is ``"drop"`` or ``"width"``; ``width`` is set for resizes."""

    kind: str
    layer: str
    width: int | None = None


@dataclass(frozen=True)
class Variant:
    """A parsed variant: its text as given and the operations in order."""

    text: str
    operations: tuple[Operation, ...]

    @property
    def is_base(self) -> bool:
        return not self.operations

    @property
    def slug(self) -> str:
        """A folder-safe name (``drop-conv3-conv4``)."""
        if self.is_base:
            return BASE
        cleaned = re.sub(r"[^A-Za-z0-9_.=-]+", "-", self.text.replace(":", "-").replace("=", "-"))
        return cleaned.strip("-.") or "variant"


def parse_variant(text: str) -> Variant:
    """``"drop:conv3,conv4;width:conv2=512"`` -> ``Variant``; ``"base"`` or ``""`` is the unchanged model.

    Raises:
        BadArgument: unknown operation or malformed width.
    """
    stripped = text.strip()
    if stripped.lower() in ("", BASE):
        return Variant(BASE, ())
    operations: list[Operation] = []
    for part in filter(None, (p.strip() for p in stripped.split(";"))):
        kind, sep, rest = part.partition(":")
        kind = kind.strip().lower()
        if not sep or not rest.strip():
            raise BadArgument(f"--variant {shown(text)}", f"{shown(repr(part))} is not KIND:LAYERS", "e.g. drop:conv3,conv4 or width:conv2=512")
        if kind not in ("drop", "width"):
            raise BadArgument(f"--variant {shown(text)}", f"unknown operation {shown(repr(kind))}", "use drop:LAYERS or width:LAYER=N")
        for item in filter(None, (i.strip() for i in rest.split(","))):
            if kind == "drop":
                operations.append(Operation("drop", item))
                continue
            layer, eq, number = item.partition("=")
            try:
                width = parse_int(number, subject="width", minimum=1, maximum=MAX_WIDTH) if eq else None
            except BadArgument as exc:
                raise BadArgument(
                    f"--variant {shown(text)}", f"{shown(repr(item))} is not LAYER=N with N a whole number from 1 to {MAX_WIDTH}",
                    "e.g. width:conv2=512",
                ) from exc
            if width is None:
                raise BadArgument(f"--variant {shown(text)}", f"{shown(repr(item))} is not LAYER=N", "e.g. width:conv2=512")
            operations.append(Operation("width", layer.strip(), width))
    if not operations:
        raise BadArgument(f"--variant {shown(text)}", "names no layer")
    return Variant(stripped, tuple(operations))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply_variant(
    module: nn.Module,
    variant: Variant | str,
    *,
    stages: dict[str, str],
    input_size: Sequence[int],
) -> nn.Module:
    """Apply ``variant`` to ``module`` in place (a freshly built model) and check it still runs.

    Args:
        stages: the model's ``alias -> module path`` table (``conv1`` -> ``features.2``).
        input_size: ``(C, H, W)`` the model takes.

    Returns:
        ``module``.

    Raises:
        BadArgument: unknown layer, a layer that is not Conv2d/Linear, dropping the output layer,
            or a variant that no longer runs.
    """
    if isinstance(variant, str):
        variant = parse_variant(variant)
    for operation in variant.operations:
        _apply(module, operation, stages, variant.text)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            module(torch.zeros((2, *input_size), device=device))
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise BadArgument(f"--variant {variant.text}", f"the changed network no longer runs: {first}") from exc
    finally:
        module.train(was_training)
    return module


def _apply(module: nn.Module, operation: Operation, stages: dict[str, str], text: str) -> None:
    order = [(name, sub) for name, sub in module.named_modules() if name]
    names = [name for name, _ in order]
    index = _layer_index(order, operation.layer, stages, text)
    path, layer = order[index]
    following = _following(order, index)
    consumer = next((i for i in following if isinstance(order[i][1], (nn.Conv2d, nn.Linear))), None)
    if operation.kind == "drop":
        if consumer is None:
            raise BadArgument(f"--variant {text}", f"{operation.layer} is the output layer and cannot be dropped")
        norm = _norm_after(order, index, consumer)
        activation = _activation_after(order, index, consumer)
        for i in (index, norm, activation):
            if i is not None:
                _replace(module, names[i], nn.Identity())
        channels_in, channels_out = _io(layer)
        if channels_in != channels_out:
            _rewire_input(module, names[consumer], order[consumer][1], old=channels_out, new=channels_in, text=text)
        return
    assert operation.width is not None
    new = _resized(layer, operation.width)
    _replace(module, path, new)
    if consumer is None:
        raise BadArgument(f"--variant {text}", f"{operation.layer} is the output layer; its width is the class count")
    norm = _norm_after(order, index, consumer)
    if norm is not None:
        old_norm = order[norm][1]
        assert isinstance(old_norm, _NORMS)
        _replace(module, names[norm], type(old_norm)(operation.width, eps=old_norm.eps, momentum=old_norm.momentum,
                                                     affine=old_norm.affine,
                                                     track_running_stats=old_norm.track_running_stats))
    _rewire_input(module, names[consumer], order[consumer][1], old=_io(layer)[1], new=operation.width, text=text)


def _layer_index(order: list[tuple[str, nn.Module]], name: str, stages: dict[str, str], text: str) -> int:
    names = [n for n, _ in order]
    path = stages.get(name, name)
    if path not in names:
        raise BadArgument(f"--variant {text}", f"no layer {name!r}", close_matches(name, [*stages, *names]))
    index = names.index(path)
    if isinstance(order[index][1], nn.Identity):
        raise BadArgument(f"--variant {text}", f"{name} is already dropped")
    if isinstance(order[index][1], (nn.Conv2d, nn.Linear)):
        return index
    if name in stages:
        # A stage alias names the stage's output (its activation); its layer is the conv before it.
        for i in range(index - 1, -1, -1):
            if isinstance(order[i][1], (nn.Conv2d, nn.Linear)):
                return i
    raise BadArgument(
        f"--variant {text}", f"{name} is a {type(order[index][1]).__name__}; only Conv2d and Linear layers can change"
    )


def _following(order: list[tuple[str, nn.Module]], index: int) -> list[int]:
    # Leaf modules registered after `index` (containers are skipped: their children follow).
    return [i for i in range(index + 1, len(order)) if not list(order[i][1].children())]


def _norm_after(order: list[tuple[str, nn.Module]], index: int, stop: int) -> int | None:
    for i in range(index + 1, stop):
        sub = order[i][1]
        if isinstance(sub, _NORMS):
            return i
        if isinstance(sub, (ACTIVATIONS, nn.MaxPool2d, nn.AvgPool2d)):
            return None
    return None


def _activation_after(order: list[tuple[str, nn.Module]], index: int, stop: int) -> int | None:
    for i in range(index + 1, stop):
        if isinstance(order[i][1], ACTIVATIONS):
            return i
    return None


def _io(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    assert isinstance(layer, nn.Linear)
    return layer.in_features, layer.out_features


def _check_plain_conv(layer: nn.Conv2d, what: str) -> None:
    if layer.groups != 1:
        raise BadArgument(what, f"cannot change a grouped/depthwise convolution (groups={layer.groups})")


def _resized(layer: nn.Module, width: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        _check_plain_conv(layer, f"width {width}")
        return _conv_like(layer, layer.in_channels, width)
    assert isinstance(layer, nn.Linear)
    return nn.Linear(layer.in_features, width, bias=layer.bias is not None)


def _conv_like(layer: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, layer.kernel_size, stride=layer.stride, padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,  # type: ignore[arg-type]
    )


def _rewire_input(module: nn.Module, path: str, consumer: nn.Module, *, old: int, new: int, text: str) -> None:
    if isinstance(consumer, nn.Conv2d):
        _check_plain_conv(consumer, f"--variant {text}")
        if consumer.in_channels != old:
            raise BadArgument(f"--variant {text}", f"{path} does not read the changed layer's {old} channels")
        _replace(module, path, _conv_like(consumer, new, consumer.out_channels))
        return
    assert isinstance(consumer, nn.Linear)
    if consumer.in_features % old:
        raise BadArgument(f"--variant {text}", f"{path} reads {consumer.in_features} features, not a multiple of {old}")
    per_channel = consumer.in_features // old
    _replace(module, path, nn.Linear(new * per_channel, consumer.out_features, bias=consumer.bias is not None))


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, child, new)


def variant_builder(
    build: Callable[[int], nn.Module], variant: Variant, *, stages: dict[str, str], input_size: Sequence[int]
) -> Callable[[int], nn.Module]:
    """Wrap a registry ``build(num_classes)`` so it returns the variant."""

    def make(num_classes: int) -> nn.Module:
        return apply_variant(build(num_classes), variant, stages=stages, input_size=input_size)

    return make
