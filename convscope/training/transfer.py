"""Transfer learning (Zeiler & Fergus section 5.2): a new classifier head on learned features.

The head and the backbone are found from the module graph, not from names: one traced forward at
the model's input size (``convscope.probes.layout.measure_module``) gives every module's output
layout and the order in which the modules finished.

* The **head** is the last module with parameters of its own to run: it must be a ``Linear`` or a
  ``Conv2d`` (SqueezeNet's 1×1 convolution classifier) whose outputs are the logits' count.
  timm models name theirs (``get_classifier``) and replace it themselves (``reset_classifier``),
  exactly as ``timm.create_model(name, num_classes=n)`` builds it.
* ``replace_head`` swaps it for a freshly initialised one of the same kind with the new class
  count (``torchvision``'s ``num_classes=n`` builds the same shapes, so a checkpoint reloads).
* ``freeze_prefix`` fixes every parameter but those of the modules that run from a boundary on:

  - ``features``: the boundary is the first module with parameters whose output is a vector (the
    first fully connected layer; the head itself for ResNet, SqueezeNet, EfficientNet...). The
    convolutional feature extractor is fixed, the fully connected classifier retrains.
  - ``all-but-last``: the boundary is the head (the paper's setting: layers 1-7 fixed, a new
    softmax classifier trained on top).

  Parameters held by a container rather than a layer (a ViT's ``cls_token`` on the root, a
  ConvNeXt block's ``layer_scale``) are frozen with the backbone. Frozen modules get
  ``requires_grad=False`` and are kept in eval mode while training (``hold_eval``), so BatchNorm
  running statistics and dropout there do not change either: the frozen part is a fixed
  function, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from convscope.errors import BadArgument
from convscope.preprocess import Preprocess
from convscope.training.wording import literal, option_error

FREEZE_MODES = ("none", "features", "all-but-last")


def linear_layers(module: nn.Module) -> list[str]:
    """Module paths of the ``nn.Linear`` layers, in registration order."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]


@dataclass(frozen=True)
class Graph:
    """What one traced forward says about a classifier.

    Attributes:
        head: module path of the classifier layer (the last module with parameters to run).
        features_end: the first module with parameters whose output is a vector (the first
            fully connected layer; the head when there is no other).
        order: module paths in the order their first call finished.
        classes: the logits' count.
    """

    head: str
    features_end: str
    order: tuple[str, ...]
    classes: int


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _subject(name: str) -> str:
    return literal(name) if name else "model"


def classifier_graph(module: nn.Module, input_size: Sequence[int], name: str = "") -> Graph:
    """Find the classifier head and the end of the feature extractor from one traced forward.

    Args:
        module: the network (its flags are restored; no gradient is taken).
        input_size: ``(C, H, W)`` to trace at (the preprocessing's input size).
        name: the model, for messages.

    Raises:
        BadArgument: the output is not a vector of class scores, or the last layer with
            parameters is not a ``Linear`` / ``Conv2d`` producing them.
        UnknownLayer: the forward fails at this input size.
    """
    from convscope.probes.layout import measure_module

    measured = measure_module(module, input_size=input_size)
    subject = _subject(name)
    output = measured.output
    if output.kind != "vector" or output.channels is None:
        raise option_error(BadArgument, subject, literal(f"returns {output.describe()}, not a vector of class scores"),
                           "train a classifier (its forward returns (N, classes) logits)")
    paths = dict(module.named_modules())
    owners = [p for p in measured.order if _owns_parameters(paths[p])]
    if not owners:
        raise option_error(BadArgument, subject, "has no layer with parameters to use as a classifier head")
    head = owners[-1]
    layer = paths[head]
    outputs = layer.out_features if isinstance(layer, nn.Linear) else (
        layer.out_channels if isinstance(layer, nn.Conv2d) else None)
    if outputs != output.channels or measured.calls.get(head, 0) != 1:
        raise option_error(
            BadArgument, subject,
            literal(f"its last layer with parameters, {head} ({type(layer).__name__}), is not a Linear or Conv2d "
                    f"classifier giving the {output.channels} class scores"),
            "wrap the model so that its last layer is the classifier",
        )
    vectors = [p for p in owners if (lay := measured.layouts.get(p)) is not None and lay.kind == "vector"]
    features_end = vectors[0] if vectors else head
    return Graph(head, features_end, measured.order, int(output.channels))


def _timm_head(module: nn.Module) -> str | None:
    """The path of a timm model's own classifier (``get_classifier``), or ``None``."""
    get = getattr(module, "get_classifier", None)
    if not callable(get) or not callable(getattr(module, "reset_classifier", None)):
        return None
    try:
        found = get()
    except Exception:  # noqa: BLE001 - a model whose get_classifier needs arguments: use the graph
        return None
    if not isinstance(found, nn.Module) or not _owns_any(found):
        return None
    return next((p for p, sub in module.named_modules() if sub is found), None)


def _owns_any(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def replace_head(module: nn.Module, num_classes: int, input_size: Sequence[int] | None = None, name: str = "") -> str:
    """Replace the classifier head with a freshly initialised one of ``num_classes`` outputs.

    Args:
        module: the network, changed in place.
        num_classes: the new class count.
        input_size: ``(C, H, W)`` to trace the graph at. ``None``: the last ``Linear`` is the
            head (the registry's CNNs, whose classifier is one).
        name: the model, for messages.

    Returns:
        the head's module path.

    Raises:
        BadArgument: no head can be found (see ``classifier_graph``), or, without
            ``input_size``, the network has no ``Linear`` layer.
    """
    if input_size is None:
        heads = linear_layers(module)
        if not heads:
            raise option_error(BadArgument, "{init_from}", "the network has no Linear classifier layer to replace")
        path = heads[-1]
    else:
        timm_path = _timm_head(module)
        if timm_path is not None:
            module.reset_classifier(num_classes)  # type: ignore[operator]
            classifier_graph(module, input_size, name)  # the new head gives num_classes scores
            return timm_path
        path = classifier_graph(module, input_size, name).head
    old = module.get_submodule(path)
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d) and old.groups == 1:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, stride=old.stride,  # type: ignore[arg-type]
                        padding=old.padding, dilation=old.dilation, bias=old.bias is not None,  # type: ignore[arg-type]
                        padding_mode=old.padding_mode)
    else:
        raise option_error(BadArgument, _subject(name),
                           literal(f"its classifier {path} is a {type(old).__name__}, which cannot be resized"))
    new.to(device=old.weight.device, dtype=old.weight.dtype)  # type: ignore[arg-type]
    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, child, new)
    return path


@dataclass(frozen=True)
class Frozen:
    """What ``freeze_prefix`` fixed.

    Attributes:
        mode: one of ``FREEZE_MODES``.
        modules: paths of the frozen modules, outermost only, in the order they run (held in
            eval mode while training).
        parameters: names of the frozen parameters.
        head: the classifier layer (``""`` when nothing is frozen).
        boundary: the first module that keeps training (``""`` when nothing is frozen).
        trainable: names of the parameters that still train.
    """

    mode: str
    modules: tuple[str, ...]
    parameters: tuple[str, ...]
    head: str = ""
    boundary: str = ""
    trainable: tuple[str, ...] = ()

    def hold_eval(self, module: nn.Module) -> None:
        """Call after ``module.train()``: put the frozen part back in eval mode."""
        for path in self.modules:
            module.get_submodule(path).eval()

    def record(self, module: nn.Module) -> dict[str, Any]:
        """The JSON record of what is frozen (``result.json``, ``--json``)."""
        sizes = dict(module.named_parameters())
        return {
            "mode": self.mode,
            "head": self.head or None,
            "trains_from": self.boundary or None,
            "frozen_modules": list(self.modules),
            "frozen_parameters": sum(sizes[n].numel() for n in self.parameters if n in sizes),
            "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        }

    def describe(self, module: nn.Module) -> str | None:
        """One sentence for the run's output, or ``None`` when nothing is frozen."""
        if self.mode == "none":
            return None
        record = self.record(module)
        shown = ", ".join(self.modules[:6]) + (f" and {len(self.modules) - 6} more" if len(self.modules) > 6 else "")
        return (f"freeze {self.mode}: froze {record['frozen_parameters']:,} parameters ({shown}: everything that "
                f"runs before {self.boundary}); training {record['trainable_parameters']:,} from {self.boundary} on "
                f"(head {self.head})")


def freeze_prefix(module: nn.Module, mode: str, input_size: Sequence[int] | None = None, name: str = "") -> Frozen:
    """Freeze the backbone: every parameter but those of the modules that run from the boundary on.

    Args:
        module: the network (its head already replaced).
        mode: ``none``, ``features`` (boundary: the first fully connected layer) or
            ``all-but-last`` (boundary: the head).
        input_size: ``(C, H, W)`` to trace the graph at; ``None``: the network's ``Linear``
            layers in registration order are the fully connected part (registry CNNs).
        name: the model, for messages.

    Raises:
        BadArgument: unknown mode, or a network whose head cannot be found.
    """
    if mode not in FREEZE_MODES:
        from convscope.errors import close_matches

        raise option_error(BadArgument, f"{{freeze}} {literal(mode)}", "unknown freeze mode",
                           literal(close_matches(mode, FREEZE_MODES)))
    if mode == "none":
        return Frozen(mode, (), (), trainable=tuple(n for n, p in module.named_parameters() if p.requires_grad))
    if input_size is None:
        heads = linear_layers(module)
        if not heads:
            raise option_error(BadArgument, f"{{freeze}} {mode}", "the network has no Linear layer to keep training")
        order = tuple(p for p, _ in module.named_modules() if p)
        head, features_end = heads[-1], heads[0]
    else:
        graph = classifier_graph(module, input_size, name)
        order, head, features_end = graph.order, graph.head, graph.features_end
    boundary = features_end if mode == "features" else head
    cut = order.index(boundary)
    training = set(order[cut:])  # modules that run from the boundary on keep their parameters
    training |= {p for p in order[:cut] if boundary.startswith(p + ".") and p}
    # Containers of the boundary run around it (in registration order they come first): not frozen.
    before = [p for p in order[:cut] if not boundary.startswith(p + ".")]
    # Outermost modules that finished before the boundary (an ancestor of the boundary finishes after it).
    outermost = [p for p in before if not any(p.startswith(q + ".") for q in before if q != p)]
    frozen_parameters: list[str] = []
    trainable: list[str] = []
    for path, sub in module.named_modules():
        for pname, parameter in sub.named_parameters(recurse=False):
            full = f"{path}.{pname}" if path else pname
            if path in training:
                trainable.append(full)
            else:
                parameter.requires_grad_(False)
                frozen_parameters.append(full)
    return Frozen(mode, tuple(outermost), tuple(frozen_parameters), head, boundary, tuple(trainable))
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
