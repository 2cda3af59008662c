"""Argument checks shared by every public function, so a bad argument fails at the call with
one line naming it, what was expected and what was given, instead of deep inside a forward pass.

What the methods take as ``images``:

- a normalised float tensor ``(N, C, H, W)`` (or one image ``(C, H, W)``), as
  ``loaded.preprocess.to_tensor`` makes it: finite values, the channel count of the network's
  first convolution, a spatial size the network can take;
- a PIL image or a list/tuple of them, converted with the model's own preprocessing.

They refuse ``None``, paths (methods never read files: decode with ``convscope.load_image``, or
``loaded.preprocess.load_image`` which decodes big photos at reduced size), numpy arrays (the
layout is ambiguous: wrap pixels with ``PIL.Image.fromarray``, a normalised batch with
``torch.from_numpy``), integer, bool and complex tensors, empty batches and lists with
anything but PIL images in them.

Errors are :class:`~convscope.errors.BadInputType` (wrong kind, also a ``TypeError``) and
:class:`~convscope.errors.BadInput` (wrong value, also a ``ValueError``); both are
``ConvscopeError``s, so the CLI prints them as one line.

Checks cost one pass over the batch (finiteness), except for one case: an input whose height or
width differs from the model's preset is test-run once, as a single all-zero image in eval mode
without gradients, so that a size the network cannot take is reported here rather than as a
convolution error many frames deep (the run calls the network's own forward hooks, if the user
registered any, once more). At the preset size (everything the CLI and
``preprocess.to_tensor`` make) nothing runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from convscope.errors import BadInput, BadInputType

if TYPE_CHECKING:
    from convscope.types import LoadedModel

IMAGES_EXPECTED = "a PIL image, a list of them, or a normalised (N, C, H, W) float tensor"
TARGET_EXPECTED = "None (top-1), a class index (int), a label (str), or one of those per image"
LOAD_HINT = "methods take images, not files: decode it with convscope.load_image(path)"


def describe(value: Any) -> str:
    """A short account of what was given, for error messages (``str 'cat.jpg'``, ``numpy array
    of shape (224, 224, 3) uint8``)."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    kind = type(value)
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        shown = text if len(text) <= 60 else text[:57] + "..."
        return f"{kind.__name__} {shown!r}"
    if isinstance(value, (bool, int, float, complex)):
        return f"{kind.__name__} {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a {kind.__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
    if kind.__module__.startswith("PIL."):
        return f"a {value.mode} PIL image of {value.size[0]}x{value.size[1]}"
    return f"a {kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else f"a {kind.__name__}"


def refuse_non_image(value: Any, argument: str, expected: str = IMAGES_EXPECTED) -> None:
    """Raise ``BadInputType`` for the kinds that are never images: ``None``, paths, bytes and
    numpy arrays, each with the conversion that would work."""
    hint = None
    if isinstance(value, (str, os.PathLike)):
        hint = LOAD_HINT
    elif isinstance(value, (bytes, bytearray)):
        hint = "decode it first: PIL.Image.open(io.BytesIO(data))"
    elif isinstance(value, np.ndarray):
        hint = (
            "wrap 0..255 pixels with PIL.Image.fromarray(array), "
            "or a normalised (N, C, H, W) batch with torch.from_numpy(array)"
        )
    elif value is not None:
        return
    raise BadInputType(argument, f"expected {expected}, got {describe(value)}", hint)


def image_batch(
    loaded: LoadedModel, images: Any, argument: str = "images", *, whole_network: bool = True
) -> torch.Tensor:
    """Check ``images`` and return them as a batch on the model's device and dtype.

    Args:
        loaded: the model the batch is for.
        images: see the module notes.
        argument: the name used in messages.
        whole_network: check that the whole network takes the input's size (the test run of
            the module notes); ``False`` for callers that run only the first layers.

    Returns:
        ``(N, C, H, W)`` tensor with ``N >= 1``, on ``loaded.device`` in ``loaded.dtype``.

    Raises:
        BadInputType: not images, or a tensor that is not floating point.
        BadInput: an empty batch or list, a tensor of another rank, a channel count other than
            the network's, NaN or infinite values, or a size the network cannot take.
    """
    refuse_non_image(images, argument)
    if not isinstance(images, (torch.Tensor, list, tuple)) and not _is_pil(images):
        raise BadInputType(argument, f"expected {IMAGES_EXPECTED}, got {describe(images)}")
    if isinstance(images, torch.Tensor):
        batch = _check_tensor(loaded, images, argument)
    else:
        batch = loaded.preprocess.to_tensor(images, argument=argument)
    batch = batch.to(device=loaded.device, dtype=loaded.dtype)
    _check_finite(batch, argument)
    if whole_network:
        _check_fits(loaded, batch, argument)
    return batch


def _is_pil(value: Any) -> bool:
    # Without importing PIL (methods never do): any PIL.Image.Image subclass lives in PIL.*.
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(value).__mro__)


def _check_tensor(loaded: LoadedModel, images: torch.Tensor, argument: str) -> torch.Tensor:
    if images.dim() not in (3, 4):
        raise BadInput(
            argument, f"expected a (N, C, H, W) or (C, H, W) tensor, got shape {tuple(images.shape)}"
        )
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    if batch.shape[0] == 0:
        raise BadInput(argument, f"empty batch: shape {tuple(batch.shape)} holds no image")
    if images.is_complex() or not images.is_floating_point():
        hint = None
        if not images.is_complex():
            hint = "for 0..255 pixels use loaded.preprocess.normalize(x.float() / 255)"
        raise BadInputType(
            argument, f"expected a normalised floating-point tensor, got {describe(images)}", hint
        )
    if 0 in batch.shape[2:]:
        raise BadInput(argument, f"has no pixels: shape {tuple(batch.shape)}")
    expected = input_channels(loaded)
    got = batch.shape[1]
    if expected is not None and got != expected:
        raise BadInput(
            argument,
            f"has {got} channel{'s' if got != 1 else ''} (shape {tuple(batch.shape)}), "
            f"{loaded.name} takes {expected}",
            _channel_hint(got, expected),
        )
    return batch


def input_channels(loaded: LoadedModel) -> int | None:
    """Channels the network reads: its first convolution's ``in_channels`` (``None`` without one)."""
    conv = loaded.module.get_submodule(loaded.first_conv) if loaded.first_conv else None
    if not isinstance(conv, nn.Conv2d):
        conv = next((m for m in loaded.module.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _channel_hint(got: int, expected: int) -> str:
    if got == 1 and expected == 3:
        return "repeat the grey channel with x.expand(-1, 3, -1, -1), or pass PIL images, which are converted"
    if got == 4 and expected == 3:
        return "drop the alpha channel with x[:, :3], or pass PIL images, which are converted"
    if expected == 1:
        return "convert to grey first, or pass PIL images, which are converted"
    return "pass PIL images to have the model's preprocessing convert them"


def _check_finite(batch: torch.Tensor, argument: str) -> None:
    # A finite sum means every value is finite (a NaN or an infinity would make it NaN or
    # infinite), and costs one vectorised read of the batch instead of a boolean copy of it:
    # 0.4 ms instead of 9.5 ms for 32 images of 224x224 on CPU (measured here). A sum that is not
    # finite may only have overflowed: then the exact test decides.
    if batch.is_floating_point() and bool(torch.isfinite(batch.sum())):
        return
    if bool(torch.isfinite(batch).all()):
        return
    nan = int(torch.isnan(batch).sum())
    inf = int(torch.isinf(batch).sum())
    raise BadInput(
        argument,
        f"holds {nan} NaN and {inf} infinite value{'s' if inf != 1 else ''} "
        f"(of {batch.numel()}); the network would return NaN scores",
        "check how the tensor was made, e.g. a division by a zero std" if nan else None,
    )


def _check_fits(loaded: LoadedModel, batch: torch.Tensor, argument: str) -> None:
    height, width = int(batch.shape[-2]), int(batch.shape[-1])
    crop = loaded.preprocess.crop
    if (height, width) == (crop, crop):
        return
    from convscope.probes.hooks import eval_mode

    def runs(probe: torch.Tensor) -> RuntimeError | None:
        try:
            with eval_mode(loaded.module), torch.inference_mode():
                loaded.module(probe)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            return exc
        return None

    failure = runs(batch.new_zeros((1, *batch.shape[1:])))
    if failure is None:
        return
    lines = str(failure).strip().splitlines()
    first = lines[0][:160] if lines else type(failure).__name__
    if runs(batch.new_zeros((1, batch.shape[1], crop, crop))) is not None:
        # Fails at its preset size too: a wrapped module whose preset is not its input size
        # (or a broken network; the original error stays chained).
        raise BadInput(
            argument,
            f"{loaded.name} fails on a {height}x{width} input: {first}",
            f"and on its preset {crop}x{crop} input too; wrap_model it with the Preprocess of the size it takes",
        ) from failure
    fit = "is too small for" if height <= crop and width <= crop else "does not fit"
    raise BadInput(
        argument,
        f"{height}x{width} pixels {fit} {loaded.name}: {first}",
        f"it takes {crop}x{crop}; loaded.preprocess.to_tensor resizes images to that",
    ) from failure


def check_target(target: Any, argument: str = "target") -> None:
    """``target`` is ``None``, a class index, a label, or a sequence / 1-D tensor of those.

    Range and label lookup need the model's outputs and happen later
    (``methods.targets.resolve_targets``).

    Raises:
        BadInputType: any other kind (a float, a bool, a float tensor...).
    """
    if target is None or isinstance(target, str) or _is_index(target):
        return
    if isinstance(target, torch.Tensor):
        if target.dim() > 1 or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise BadInputType(argument, f"expected {TARGET_EXPECTED}, got {describe(target)}")
        return
    if isinstance(target, (bytes, bytearray)) or not isinstance(target, (Sequence, np.ndarray)):
        raise BadInputType(argument, f"expected {TARGET_EXPECTED}, got {describe(target)}")
    items: list[Any] = list(target)
    for index, item in enumerate(items):
        if not (isinstance(item, str) or _is_index(item)):
            raise BadInputType(
                f"{argument}[{index}]", f"expected a class index (int) or a label (str), got {describe(item)}"
            )


def _is_index(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, Integral) and not isinstance(value, bool)


def layer_names(layers: str | Sequence[str] | None, argument: str = "layers") -> list[str] | None:
    """Normalise a ``layers`` argument: a lone name counts as one layer (``"conv1"`` is
    ``["conv1"]``, not five one-letter names); ``None`` or an empty list means the default.

    Raises:
        BadInputType: not a name or a sequence of names.
    """
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    if not isinstance(layers, (Sequence, set, frozenset)) or isinstance(layers, (bytes, bytearray)):
        raise BadInputType(argument, f"expected a layer name or a list of them, got {describe(layers)}")
    names = list(layers)
    for index, name in enumerate(names):
        check_layer_name(name, f"{argument}[{index}]")
    return names or None


def check_layer_name(name: Any, argument: str = "layer") -> None:
    """Raise ``BadInputType`` unless ``name`` is a string (an alias or a module path)."""
    if not isinstance(name, str):
        raise BadInputType(
            argument, f"expected a layer name (str), got {describe(name)}",
            "names are aliases like 'conv1' or module paths like 'features.3'; 'convscope layers' lists them",
        )
