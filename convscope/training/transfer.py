"""Transfer learning (Zeiler & Fergus section 5.2): a new classifier head on learned features.

``replace_head`` swaps the network's last ``Linear`` for a freshly initialised one with the new class
count; ``freeze_prefix`` fixes everything registered before a chosen layer:

* ``features``: every module before the first ``Linear`` (the convolutional feature extractor,
  with its BatchNorm statistics); the fully connected classifier is retrained.
* ``all-but-last``: everything but the last ``Linear`` (the paper's setting: layers 1-7 fixed, a
  new softmax classifier trained on top).

Frozen modules get ``requires_grad=False`` and are kept in eval mode while training (``hold_eval``),
so BatchNorm running statistics and dropout there do not change either: the frozen part is a
fixed function, bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from convscope.errors import BadArgument
from convscope.preprocess import Preprocess
from convscope.training.wording import literal, option_error

FREEZE_MODES = ("none", "features", "all-but-last")


def linear_layers(module: nn.Module) -> list[str]:
    """Module paths of the ``nn.Linear`` layers, in registration order."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]


def replace_head(module: nn.Module, num_classes: int) -> str:
    """Replace the last ``Linear`` with a new one of ``num_classes`` outputs (default init).

    Returns:
        the head's module path.

    Raises:
        BadArgument: the network has no ``Linear`` layer.
    """
    heads = linear_layers(module)
    if not heads:
        raise option_error(BadArgument, "{init_from}", "the network has no Linear classifier layer to replace")
    path = heads[-1]
    old = module.get_submodule(path)
    assert isinstance(old, nn.Linear)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, child, new)
    return path


@dataclass(frozen=True)
class Frozen:
    """What ``freeze_prefix`` fixed.

    Attributes:
        mode: one of ``FREEZE_MODES``.
        modules: paths of the frozen leaf modules (held in eval mode while training).
        parameters: names of the frozen parameters.
    """

    mode: str
    modules: tuple[str, ...]
    parameters: tuple[str, ...]

    def hold_eval(self, module: nn.Module) -> None:
        """Call after ``module.train()``: put the frozen part back in eval mode."""
        for path in self.modules:
            module.get_submodule(path).eval()


def freeze_prefix(module: nn.Module, mode: str) -> Frozen:
    """Freeze the modules registered before the first (``features``) or last (``all-but-last``) ``Linear``.

    Raises:
        BadArgument: unknown mode, or a network without ``Linear`` layers.
    """
    if mode not in FREEZE_MODES:
        from convscope.errors import close_matches

        raise option_error(BadArgument, f"{{freeze}} {literal(mode)}", "unknown freeze mode",
                           literal(close_matches(mode, FREEZE_MODES)))
    if mode == "none":
        return Frozen(mode, (), ())
    heads = linear_layers(module)
    if not heads:
        raise option_error(BadArgument, f"{{freeze}} {mode}", "the network has no Linear layer to keep training")
    boundary = heads[0] if mode == "features" else heads[-1]
    frozen_modules: list[str] = []
    for name, sub in module.named_modules():
        if name == boundary:
            break
        if name and not list(sub.children()):
            frozen_modules.append(name)
    frozen_parameters: list[str] = []
    for path in frozen_modules:
        for pname, parameter in module.get_submodule(path).named_parameters(recurse=False):
            parameter.requires_grad_(False)
            frozen_parameters.append(f"{path}.{pname}")
    return Frozen(mode, tuple(frozen_modules), tuple(frozen_parameters))


def grayscale_note(data: str | os.PathLike[str], preprocess: Preprocess, arch: str) -> str | None:
    """What happens to a folder's photos on the way into a 1-channel model, or ``None``.

    A model trained on Fashion-MNIST (``zfnet_mnist``) takes ``1x28x28`` input; photos given to it
    (transfer to an image folder) lose their colour and nearly all their pixels, which a user
    reading the accuracy should know.
    """
    from convscope.training.data import BUILTIN_DATASETS

    if preprocess.channels != 1 or os.fspath(data) in BUILTIN_DATASETS:
        return None
    side = preprocess.crop
    return (
        f"images are converted to {preprocess.channels}\u00d7{side}\u00d7{side} grayscale "
        f"({arch} takes 1-channel {side}\u00d7{side} input; colour is discarded)"
    )
