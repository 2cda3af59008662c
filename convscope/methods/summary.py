"""Model summary: shapes, parameters, window settings, receptive fields, cost (measurement only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convscope.errors import BadArgument
from convscope.methods._common import ModelLike
from convscope.models.load import as_loaded
from convscope.probes.geometry import trace, window_of
from convscope.probes.layers import alias_of
from convscope.types import LayerInfo, LoadedModel, ModelSummary


def _mult_adds(module: nn.Module, output_shape: tuple[int, ...] | None) -> int:
    if output_shape is None:
        return 0
    per_image = 1
    for dim in output_shape[1:]:
        per_image *= dim
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


# One image's forward pass is traced for real; beyond this much memory the caller must say so.
DEFAULT_MAX_ACTIVATION_BYTES = 4 * 2**30


def summary(
    model: ModelLike,
    *,
    input_size: Sequence[int] | None = None,
    max_activation_bytes: int | None = DEFAULT_MAX_ACTIVATION_BYTES,
) -> ModelSummary:
    """Per-layer summary for one image of ``input_size`` (default: the model's preset).

    Args:
        input_size: ``(C, H, W)``.
        max_activation_bytes: refuse an ``input_size`` whose forward pass would hold more than
            this in inputs and layer outputs (estimated before anything is allocated: the
            preset-size pass scaled by the pixel count); ``None``: no limit.

    Returns:
        ``ModelSummary``: one ``LayerInfo`` per leaf-module call in forward order, totals,
        and notes on inexact receptive fields.

    Raises:
        BadArgument: a malformed ``input_size``, one the model cannot take, or one over the limit.
    """
    loaded = as_loaded(model)
    size = tuple(int(v) for v in (input_size or loaded.preprocess.input_size))
    if len(size) != 3 or min(size) < 1:
        raise BadArgument("--input-size", f"must be C,H,W with positive values, got {size}")
    if max_activation_bytes is not None:
        _check_memory(loaded, size, max_activation_bytes)
    x = torch.zeros((1, *size), device=loaded.device, dtype=loaded.dtype)
    try:
        calls = trace(loaded.module, x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadArgument("--input-size", f"{size} does not fit {loaded.name}: {first[:200]}") from exc
    depth_of = {name: name.count(".") + 1 for name, _ in loaded.module.named_modules()}
    seen: set[int] = set()
    rows = []
    inexact = False
    for call in calls:
        first_call = id(call.module) not in seen
        seen.add(id(call.module))
        own = list(call.module.parameters(recurse=False)) if first_call else []
        window = window_of(call.module)
        geo = call.geometry
        spatial = call.output_shape is not None and len(call.output_shape) == 4 and not geo.is_global
        if spatial and not geo.exact:
            inexact = True
        alias = alias_of(loaded, call.name)
        rows.append(
            LayerInfo(
                name=call.name,
                type=type(call.module).__name__,
                depth=depth_of.get(call.name, 0),
                input_shape=call.input_shape,
                output_shape=call.output_shape,
                params=sum(p.numel() for p in own),
                trainable_params=sum(p.numel() for p in own if p.requires_grad),
                kernel=window[0] if window else None,
                stride=window[1] if window else None,
                padding=window[2] if window else None,
                receptive_field=round(geo.size) if spatial else None,
                jump=round(geo.jump) if spatial else None,
                start=float(geo.start) if spatial else None,
                rf_exact=bool(spatial and geo.exact),
                mult_adds=_mult_adds(call.module, call.output_shape),
                activation_bytes=call.output_bytes,
                alias=alias if alias != call.name else None,
            )
        )
    params = list(loaded.module.parameters())
    notes = []
    if inexact:
        notes.append(
            "receptive fields marked ~ are approximate: the forward pass leaves a plain chain "
            "(residual additions, concatenations or functional ops); the value follows the main path"
        )
    return ModelSummary(
        model=loaded.name,
        input_size=size,
        layers=tuple(rows),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_mult_adds=sum(r.mult_adds for r in rows),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        activation_bytes=sum(r.activation_bytes for r in rows),
        notes=tuple(notes),
    )


def estimated_activation_bytes(model: ModelLike, input_size: Sequence[int]) -> int:
    """Bytes of the input and every layer output for one image of ``input_size``, without running it.

    Traces the model at its preset size and scales the layer outputs by the ratio of pixel
    counts (conv, pool and norm outputs grow with the area; the few fixed-size ones are
    over-counted, so this is an upper bound for larger inputs).
    """
    loaded = as_loaded(model)
    channels, height, width = (int(v) for v in input_size)
    element = torch.empty((), dtype=loaded.dtype).element_size()
    input_bytes = channels * height * width * element
    preset = tuple(int(v) for v in loaded.preprocess.input_size)
    calls = trace(loaded.module, torch.zeros((1, *preset), device=loaded.device, dtype=loaded.dtype))
    at_preset = sum(call.output_bytes for call in calls)
    ratio = (height * width) / (preset[1] * preset[2])
    return input_bytes + int(at_preset * max(ratio, 1.0))


def _check_memory(loaded: LoadedModel, size: tuple[int, ...], limit: int) -> None:
    element = torch.empty((), dtype=loaded.dtype).element_size()
    preset = tuple(int(v) for v in loaded.preprocess.input_size)
    input_bytes = size[0] * size[1] * size[2] * element
    if size[1] * size[2] <= preset[1] * preset[2] and input_bytes <= limit:
        return  # no larger than the preset, which is known to fit
    needed = input_bytes if input_bytes > limit else estimated_activation_bytes(loaded, size)
    if needed > limit:
        raise BadArgument(
            "--input-size " + ",".join(map(str, size)),
            f"one image would need about {_gib(needed)} of activations in {loaded.name}, over the "
            f"{_gib(limit)} limit",
            "raise it with --max-memory GIB, or max_activation_bytes= in Python, if the machine has the memory",
        )


def _gib(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB" if count >= 2**30 else f"{count / 2**20:,.0f} MiB"
