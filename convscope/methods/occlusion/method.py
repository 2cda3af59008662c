"""Occlusion sensitivity (Zeiler & Fergus 2014, §4.2 and Fig. 7), fast and exact.

A square of ``fill`` slides over the image; for each position we record the probability of
the target class, the most probable class, and optionally the total activation of one
feature map. The occluded copies run in chunks (bounded memory for any grid), and the early
layers are recomputed only where the square can reach them (incremental inference, see
``convscope.methods.occlusion.replay``); the result equals a plain full recomputation up to float
summation order (~1e-6). Where the incremental plan does not fit a network (squeeze-excite
blocks, shortcut convolutions, anything its checks cannot prove) every copy runs the whole
network, batched, and ``stats.note`` says why; a model that does not return ``(N, classes)``
scores is refused in one line.

Grid: window positions start at ``0, stride, 2*stride, ...`` and, by default, only whole
windows are used: ``rows = (H - window) // stride + 1`` (same for columns), as in the paper.
``cover_border=True`` adds one clipped window at the end of each axis when the stride does
not land on the border, i.e. ``ceil((H - window) / stride) + 1`` positions, which is captum's
``Occlusion`` grid.

Fill: a number (or one per channel) is in the model's *normalised input space*, like captum's
``baselines``: ``0.0`` is the dataset's mean colour. The names ``"grey"``, ``"black"`` and
``"white"`` are pixel colours (0.5, 0, 1 in ``[0, 1]``) normalised with the model's own mean and
std; Zeiler & Fergus' grey square is ``fill="grey"``.

Approximate mode (``mode="approximate"``) runs the same incremental computation on a
bfloat16 copy of the model, on hardware that computes bfloat16 natively (CPUs with AMX or
AVX-512-BF16, CUDA); elsewhere it falls back to exact and ``stats.precision`` says
``"float32"``. The explained class is still the float32 model's top-1; all probabilities,
the clean one included, come from the bfloat16 copy so that drops are consistent. Measured on
the 2-core AMX CPU this was built on (chelsea, window 16, stride 8): EfficientNet-Lite0
(pretrained) 2.0x faster than exact, probabilities within 0.026 of exact, drop maps with
rank correlation 0.97, most probable class the same at 75% of positions (the cat classes
are near-ties); AlexNet 3.5x and VGG16 4.7x faster than exact (seeded random weights, whose
near-uniform probabilities stayed within 1e-6 of exact: that says little about real weights).
Use exact mode for anything quantitative.

Speed (``bench/occlusion.py``): the clean image's activations are computed once; each chunk
of occluded copies gathers its crops and pastes its changed patches in channels-last layout
(one row gather and one ``index_copy_`` per layer), the row and column bands of a chunk
are chosen by dynamic programming so that copies with similar changed regions go together,
and the layers after the incremental chain (the classifier) run on many chunks at once, as
many as ``SUFFIX_BUDGET_BYTES`` of activations allow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from convscope.errors import BadArgument, UnknownLayer
from convscope.methods._common import ModelLike, prepare
from convscope.methods.occlusion import precision
from convscope.methods.occlusion.engine import ImageOcclusion, occlude_image
from convscope.methods.occlusion.units import record
from convscope.methods.targets import TargetLike, resolve_targets, target_labels
from convscope.probes.fold import fold_batchnorm
from convscope.probes.geometry import grid_origins
from convscope.probes.hooks import eval_mode
from convscope.probes.layers import map_layer, resolve_layer
from convscope.probes.layout import Layout
from convscope.runtime import allocator_tuned
from convscope.types import LoadedModel, Renderable

FILL_COLOURS = {"grey": 0.5, "gray": 0.5, "black": 0.0, "white": 1.0}
MODES = ("exact", "approximate", "full")


@dataclass(frozen=True)
class OcclusionStats:
    """How the occluded copies were computed.

    Attributes:
        mode: ``"incremental"`` (the early layers recomputed only around the square) or
            ``"full"`` (every copy through the whole network).
        incremental_layers: module paths computed incrementally, in forward order.
        work_fraction: multiply-adds (convolutions and linear layers) spent per occluded copy,
            as a fraction of one full forward pass; 1.0 in full mode.
        copies: occluded copies evaluated.
        precision: arithmetic of the occluded copies: ``"float32"``, or ``"bfloat16"`` /
            ``"float16"`` in approximate mode.
        fallback: why ``mode="approximate"`` ran exact (no fast half precision on this device,
            or it measured no faster here), else ``""``.
        note: why the incremental engine was cut short or not used (its plan did not fit the
            model: squeeze-excite, a skip connection, control flow it cannot prove), else
            ``""``; the values are exact either way (every copy then ran the whole network).
    """

    mode: str
    incremental_layers: tuple[str, ...]
    work_fraction: float
    copies: int
    precision: str = "float32"
    fallback: str = ""
    note: str = ""


@dataclass(frozen=True)
class OcclusionResult(Renderable):
    """The three Zeiler & Fergus occlusion maps of a batch, on the grid of window positions.

    Attributes:
        targets: ``(N,)`` int64 explained classes; ``labels`` their names.
        clean_probability: ``(N,)`` float32 softmax probability of the target without occluder.
        probability: ``(N, rows, cols)`` float32 target probability with the square at each
            position (Fig. 7 (d)).
        drop: ``(N, rows, cols)`` float32 ``clean_probability - probability``; large where the
            square hides evidence for the target.
        top_class: ``(N, rows, cols)`` int64 most probable class at each position (Fig. 7 (e));
            ``top_probability`` its probability.
        pixel_drop: ``(N, H, W)`` float32 at input resolution: each pixel's mean ``drop`` over
            the windows covering it (captum's ``Occlusion`` attribution); 0 where no window
            covers it.
        layer, channels: the feature map of (c): layer name as given, ``(N,)`` int64 channel.
        layer_layout: how the layer's output was read, for the JSON record
            (``{"layout": "NHWC", "converted": "permute(0, 3, 1, 2)"}``); ``None`` without a layer.
        activation: ``(N, rows, cols)`` float32 total activation (spatial sum) of that channel
            with the square at each position (Fig. 7 (b)); ``clean_activation`` ``(N,)``
            without it. ``None`` without a layer.
        row_origins, col_origins: top/left pixel of each window position.
        window, stride, fill: the settings; ``fill`` per input channel, in input space.
        class_names: index -> name for every class in ``targets`` and ``top_class``.
        stats: how it was computed.
    """

    targets: torch.Tensor
    labels: tuple[str, ...]
    clean_probability: torch.Tensor
    probability: torch.Tensor
    drop: torch.Tensor
    top_class: torch.Tensor
    top_probability: torch.Tensor
    pixel_drop: torch.Tensor
    layer: str | None
    channels: torch.Tensor | None
    activation: torch.Tensor | None
    clean_activation: torch.Tensor | None
    row_origins: tuple[int, ...]
    col_origins: tuple[int, ...]
    window: int
    stride: int
    fill: tuple[float, ...]
    class_names: dict[int, str]
    stats: OcclusionStats
    layer_layout: dict[str, Any] | None = None


def resolve_fill(fill: float | Sequence[float] | str, mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[float, ...]:
    """The occluder's value per input channel, in the normalised input space."""
    if isinstance(fill, str):
        key = fill.strip().lower()
        if key in FILL_COLOURS:
            pixel = FILL_COLOURS[key]
            means = list(mean) if len(mean) == channels else [mean[0]] * channels
            stds = list(std) if len(std) == channels else [std[0]] * channels
            return tuple((pixel - m) / s for m, s in zip(means, stds, strict=True))
        try:
            value = float(key)
        except ValueError:
            raise BadArgument(f"--fill {fill}", "is not grey, black, white or a number") from None
        return (value,) * channels
    if isinstance(fill, (int, float)):
        if not math.isfinite(float(fill)):
            raise BadArgument(f"--fill {fill}", "must be a finite number")
        return (float(fill),) * channels
    values = tuple(float(v) for v in fill)
    if len(values) != channels:
        raise BadArgument(f"--fill {list(values)}", f"gives {len(values)} values for {channels} input channels")
    return values


def _check_settings(window: int, stride: int, height: int, width: int, batch_size: int, mode: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise BadArgument(f"--window {window}", "must be a whole number of pixels, at least 1")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise BadArgument(f"--stride {stride}", "must be a whole number of pixels, at least 1")
    if window > min(height, width):
        raise BadArgument(f"--window {window}", f"is larger than the {height}x{width} input")
    if batch_size < 1:
        raise BadArgument(f"--batch-size {batch_size}", "must be at least 1")
    if mode not in MODES:
        raise BadArgument(f"--mode {mode}", "is not a mode", "choose from: " + ", ".join(MODES))


@allocator_tuned()  # many large batches: see convscope.runtime.allocator_tuned
def occlusion(
    model: ModelLike,
    images: Any,
    target: TargetLike = None,
    *,
    window: int = 16,
    stride: int = 8,
    fill: float | Sequence[float] | str = 0.0,
    layer: str | None = None,
    channel: int | None = None,
    batch_size: int = 64,
    mode: str = "exact",
    cover_border: bool = False,
    progress: Callable[[int], None] | None = None,
) -> OcclusionResult:
    """Slide an occluding square over each image and record the three Zeiler & Fergus maps.

    Args:
        model: a ``LoadedModel`` or ``nn.Module`` returning ``(N, classes)`` scores (softmax is
            applied here).
        images: PIL image(s), converted with the model's preprocessing, or a normalised
            ``(N, C, H, W)`` float tensor; paths, numpy arrays and ``None`` are refused
            with ``BadInputType`` (see ``convscope.validate``).
        target: ``None`` (each image's top-1 class), a class index or a label name, or one per
            image.
        window: side of the square, in input pixels.
        stride: step between positions, in input pixels.
        fill: occluder value in the normalised input space (one number or one per channel),
            or ``"grey"`` / ``"black"`` / ``"white"`` as pixel colours.
        layer: also record the total activation of one feature map of this layer (alias or
            module path); ``channel`` picks it (default: the strongest on the clean image). An
            NHWC or token layer is read through its measured layout (``probes.layout``); a
            reused module (ResNet's block ReLU) is read at its last call in each forward.
        batch_size: occluded copies per forward pass (memory is bounded by it).
        mode: ``"exact"`` (incremental inference where the network allows it, else batched
            full passes), ``"approximate"`` (the same, computed in bfloat16 on a copy of the
            model where the hardware does that fast: AMX/AVX-512-BF16 CPUs, CUDA; else exact;
            see the module notes for its measured error) or ``"full"`` (batched full passes
            only; for comparison).
        cover_border: add clipped windows at the far borders, like captum.
        progress: called with the number of copies finished after each chunk.

    Returns:
        ``OcclusionResult`` with ``(N, rows, cols)`` maps on the window grid and an
        ``(N, H, W)`` per-pixel drop.

    Raises:
        BadArgument: window < 1 or larger than the image, stride < 1, bad fill/mode/channel,
            a layer whose output is not a spatial map (NCHW, NHWC and tokens on a grid are read
            through their measured layout), or a model that does not return ``(N, classes)``
            scores (a tuple, a dict).
        BadTarget: unknown class index or label.
        UnknownLayer: a layer name that does not resolve.
    """
    loaded, batch = prepare(model, images, target=target)
    count, channels, height, width = batch.shape
    _check_settings(window, stride, height, width, batch_size, mode)
    pre = loaded.preprocess
    fill_values = resolve_fill(fill, pre.mean, pre.std, channels)
    layer_module, layout = _watched_layer(loaded, layer, (channels, height, width))
    rows = grid_origins(height, window, stride, cover_border)
    cols = grid_origins(width, window, stride, cover_border)
    module = loaded.module
    network, low, fallback = module, None, ""
    if mode == "approximate":
        twin, low, fallback = precision.approximate_twin(module, batch, batch_size)
        network = twin if twin is not None else module
    if mode == "exact" or (mode == "approximate" and low is None):  # an approximate mode that fell back runs exact
        network, layer_module = _folded(module, batch, layer_module)
    full_precision = batch
    if low is not None:
        if layer_module is not None:  # found in the half-precision twin by its path
            layer_module = network.get_submodule(next(p for p, m in module.named_modules() if m is layer_module))
        batch = batch.to(low)
    fill_tensor = torch.tensor(fill_values, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)

    per_image: list[ImageOcclusion] = []
    # no_grad, not inference_mode: the chain analysis follows tensors by version counter.
    with eval_mode(module), eval_mode(network), torch.no_grad():
        # The first image's recorded pass doubles as its clean pass (one forward fewer).
        # (The chain analysis follows tensors by identity: record the very tensor occluded.)
        image = batch[:1]
        first = [record(network, image, layer_module, layout)]  # handed over (and dropped) at n = 0
        if low is None:
            rest = [module(part) for part in torch.split(batch[1:], batch_size)] if count > 1 else []
            clean_logits = torch.cat([first[0].logits, *rest])
        else:  # the explained class is the float32 network's
            clean_logits = torch.cat([module(part) for part in torch.split(full_precision, batch_size)])
        targets = resolve_targets(target, clean_logits, loaded.categories, loaded.name)
        for n in range(count):
            image = image if n == 0 else batch[n : n + 1]
            recording = first.pop() if first else record(network, image, layer_module, layout)
            per_image.append(occlude_image(
                network, image, recording, int(targets[n]), rows, cols, window, fill_tensor, layer,
                layer_module, channel, batch_size, "full" if mode == "full" else "exact", progress, layout,
            ))
            del recording

    shape = (count, len(rows), len(cols))
    probability = torch.stack([one.probability for one in per_image]).view(shape)
    clean = torch.stack([one.clean_probability for one in per_image])
    drop = clean.view(-1, 1, 1) - probability
    top_class = torch.stack([one.top_class for one in per_image]).view(shape)
    classes = sorted(set(top_class.unique().tolist()) | set(targets.tolist()))
    names = target_labels(torch.tensor(classes, dtype=torch.int64), loaded.categories)
    activations = [one.activation for one in per_image if one.activation is not None]
    return OcclusionResult(
        targets=targets.cpu(),
        labels=target_labels(targets.cpu(), loaded.categories),
        clean_probability=clean,
        probability=probability,
        drop=drop,
        top_class=top_class,
        top_probability=torch.stack([one.top_probability for one in per_image]).view(shape),
        pixel_drop=_pixel_map(drop, rows, cols, window, height, width),
        layer=layer,
        channels=torch.tensor([one.channel for one in per_image], dtype=torch.int64) if layer is not None else None,
        activation=torch.stack(activations).view(shape) if layer is not None else None,
        clean_activation=torch.tensor([one.clean_activation for one in per_image]) if layer is not None else None,
        row_origins=rows,
        col_origins=cols,
        window=window,
        stride=stride,
        fill=fill_values,
        class_names=dict(zip(classes, names, strict=True)),
        stats=OcclusionStats(
            mode="incremental" if all(one.mode == "incremental" for one in per_image) else "full",
            incremental_layers=per_image[0].incremental_layers if per_image else (),
            work_fraction=sum(one.work_fraction for one in per_image) / max(1, len(per_image)),
            precision=str(batch.dtype).removeprefix("torch."),
            copies=count * len(rows) * len(cols),
            fallback=fallback,
            note="; ".join(dict.fromkeys(one.note for one in per_image if one.note)),
        ),
        layer_layout=layout.record() if layout is not None else None,
    )


def _folded(module: torch.nn.Module, batch: torch.Tensor,
            layer_module: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The network the occluded copies run through in ``"exact"`` mode: the copy with BatchNorm
    folded into the convolutions (``probes.fold``: one pass over each map, probabilities within
    1e-6), unless the watched layer is a folded convolution (its values would change)."""
    folded = fold_batchnorm(module, batch[:1])
    if folded.module is module:
        return module, layer_module
    if layer_module is None:
        return folded.module, None
    path = next(p for p, m in module.named_modules() if m is layer_module)
    if folded.changes(path):
        return module, layer_module
    return folded.module, folded.module.get_submodule(path)


def _watched_layer(
    loaded: LoadedModel, layer: str | None, input_size: tuple[int, int, int]
) -> tuple[torch.nn.Module | None, Layout | None]:
    """The module of ``layer`` and its layout measured at ``input_size`` (``None``, ``None``
    without a layer).

    Raises:
        UnknownLayer: no such layer.
        BadArgument: a layer whose output is not a spatial map (a vector, a tuple), named with
            its measured layout.
    """
    if layer is None:
        return None, None
    resolve_layer(loaded, layer)  # no such layer: UnknownLayer with the near names
    try:
        mapped = map_layer(loaded, layer, input_size)
    except UnknownLayer as exc:
        if exc.subject != layer:  # the model's own forward failed while measuring
            raise
        raise BadArgument(f"--layer {layer}", f"has no (N, C, H, W) feature-map output: {exc.reason}",
                          exc.hint) from None
    return mapped.module, mapped.layout


def _pixel_map(drop: torch.Tensor, rows: Sequence[int], cols: Sequence[int], window: int, height: int, width: int) -> torch.Tensor:
    """Each pixel's mean ``drop`` over the windows covering it (0 where none does).

    The windows sit on a regular grid, so the sums are one ``fold`` (transposed unfold) on a
    canvas large enough for clipped border windows, cropped to the image."""
    count, n_rows, n_cols = drop.shape
    stride_r = rows[1] - rows[0] if n_rows > 1 else 1
    stride_c = cols[1] - cols[0] if n_cols > 1 else 1
    size = ((n_rows - 1) * stride_r + window, (n_cols - 1) * stride_c + window)
    values = drop.double().reshape(count, 1, n_rows * n_cols).expand(count, window * window, -1)
    total = torch.nn.functional.fold(values, size, window, stride=(stride_r, stride_c))
    ones = torch.ones(1, window * window, n_rows * n_cols, dtype=torch.float64)
    covered = torch.nn.functional.fold(ones, size, window, stride=(stride_r, stride_c))
    total, covered = total[:, 0, :height, :width], covered[0, 0, :height, :width]
    padded = torch.zeros(count, height, width, dtype=torch.float64)
    padded[:, : total.shape[1], : total.shape[2]] = total
    cover = torch.zeros(height, width, dtype=torch.float64)
    cover[: covered.shape[0], : covered.shape[1]] = covered
    return torch.where(cover > 0, padded / cover.clamp_min(1), torch.zeros_like(padded)).float()
