"""Model summary: shapes, parameters, window settings, receptive fields, cost (measurement only)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from convscope.errors import BadArgument
from convscope.methods._common import ModelLike
from convscope.models.load import as_loaded
from convscope.probes.geometry import Geometry, LayerCall, trace, trace_steps, window_of
from convscope.probes.layers import alias_of
from convscope.types import LayerInfo, LoadedModel, ModelSummary


def _mult_adds(module: nn.Module, output_shape: tuple[int, ...] | None) -> int:
    """Multiply-adds of one call of a leaf module, per image: a convolution's per output cell, a
    linear layer's per position (once per image on a vector, H·W times on an NHWC map, L times on
    tokens: every output value costs ``in_features``)."""
    if output_shape is None:
        return 0
    per_image = math.prod(output_shape[1:])
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


# One image's forward pass is traced for real; beyond this much memory the caller must say so.
DEFAULT_MAX_ACTIVATION_BYTES = 4 * 2**30


APPROXIMATE_NOTE = (
    "receptive fields marked ~ are approximate: the forward pass leaves a plain chain "
    "(residual additions, concatenations or functional ops); the value follows the main path"
)
GLOBAL_NOTE = (
    "receptive fields marked global: every output cell can depend on every input pixel (after "
    "attention, squeeze-excite, global pooling or a fully connected layer on a flattened map)"
)
FUNCTIONS_NOTE = (
    "rows typed name() are torch functions run outside modules (attention's matrix products, "
    "F.linear on a module's weight, parameters used directly); mult-adds count convolutions, linear "
    "layers once per position, and matrix products (attention's q·kᵀ and attention·v included), "
    "not elementwise ops, normalisations or softmax"
)


def summary(
    model: ModelLike,
    *,
    input_size: Sequence[int] | None = None,
    max_activation_bytes: int | None = DEFAULT_MAX_ACTIVATION_BYTES,
) -> ModelSummary:
    """Per-layer summary for one image of ``input_size`` (default: the model's preset).

    Works on any network that runs (torchvision, timm, your own modules): maps in NCHW or NHWC,
    tokens. Receptive fields are ``exact``, ``approximate`` (residual additions, concatenations,
    functional ops) or ``global`` (attention, squeeze-excite, global pooling, fully connected
    layers): see ``convscope.probes.geometry``.

    Multiply-adds count convolutions (per output cell), linear layers per position (an
    ``nn.Linear`` on an ``(N, H, W, C)`` map costs H·W·in·out, on ``(N, L, C)`` tokens L·in·out),
    and matrix products run as torch functions outside modules: attention's ``q @ kᵀ`` and
    ``attention @ v``, ``F.linear`` on a module's weight (Swin's and ViT's projections),
    ``scaled_dot_product_attention`` and ``multi_head_attention_forward`` (its projections too).
    Elementwise ops, normalisations and softmax count nothing. Such a function is a row of its
    own, typed ``name()`` and named after the module whose parameter it reads (else the module
    running it); parameters count once, in the row that first reads them, so the rows' parameters
    add up to the model's (but for parameters the forward pass never reads).

    Args:
        input_size: ``(C, H, W)``.
        max_activation_bytes: refuse an ``input_size`` whose forward pass would hold more than
            this in inputs and layer outputs (estimated before anything is allocated: the
            preset-size pass scaled by the pixel count); ``None``: no limit.

    Returns:
        ``ModelSummary``: one ``LayerInfo`` per leaf-module call and per costly torch function
        outside modules, in forward order, totals, and notes on approximate and global receptive
        fields.

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
        steps = trace_steps(loaded.module, x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadArgument("--input-size", f"{size} does not fit {loaded.name}: {first[:200]}") from exc
    depth_of = {name: name.count(".") + 1 for name, _ in loaded.module.named_modules()}
    counted: set[int] = set()  # parameters already in a row
    rows = []
    kinds: Counter[str] = Counter()
    functions = False
    for step in steps:
        geo: Geometry | None
        if isinstance(step, LayerCall):
            used = list(step.module.parameters(recurse=False))
            kind_name, window, geo = type(step.module).__name__, window_of(step.module), step.geometry
            mult_adds = _mult_adds(step.module, step.output_shape) + step.function_mult_adds
            depth = depth_of.get(step.name, 0)
        else:
            functions = True
            used = list(step.parameters)
            kind_name, window, geo = f"{step.op}()", None, step.geometry
            mult_adds = step.mult_adds
            depth = depth_of.get(step.name, 0) + (0 if step.parameters else 1)
        own = [p for p in dict.fromkeys(used) if id(p) not in counted]
        counted.update(id(p) for p in own)
        # A field for tensors that still have positions (maps, tokens); global rows whatever their shape.
        has_field = geo is not None and step.output_shape is not None and (len(step.output_shape) >= 3 or geo.is_global)
        kind = geo.kind if has_field and geo is not None else None  # None: no tensor out
        if kind is not None and (kind != "global" or (step.output_shape is not None and len(step.output_shape) >= 3)):
            kinds[kind] += 1
        local = geo is not None and kind in ("exact", "approximate")
        alias = alias_of(loaded, step.name)
        extra = {"receptive_field_kind": kind}
        rows.append(
            LayerInfo(
                name=step.name,
                type=kind_name,
                depth=depth,
                input_shape=step.input_shape,
                output_shape=step.output_shape,
                params=sum(p.numel() for p in own),
                trainable_params=sum(p.numel() for p in own if p.requires_grad),
                kernel=window[0] if window else None,
                stride=window[1] if window else None,
                padding=window[2] if window else None,
                receptive_field=round(geo.size) if local and geo is not None else None,
                jump=round(geo.jump) if local and geo is not None else None,
                start=float(geo.start) if local and geo is not None else None,
                rf_exact=kind == "exact",
                mult_adds=mult_adds,
                activation_bytes=step.output_bytes,
                alias=alias if alias != step.name else None,
                **extra,
            )
        )
    params = list(loaded.module.parameters())
    notes = []
    if kinds["approximate"]:
        notes.append(APPROXIMATE_NOTE)
    if kinds["global"]:
        notes.append(GLOBAL_NOTE + f": {kinds['global']} of the {sum(kinds.values())} maps")
    if functions:
        notes.append(FUNCTIONS_NOTE)
    unread = sum(p.numel() for p in params if id(p) not in counted)
    if unread:
        notes.append(f"{unread:,} parameters are not read by the forward pass (in no row)")
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
