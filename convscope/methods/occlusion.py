"""Occlusion sensitivity (Zeiler & Fergus 2014, §4.2 and Fig. 7), fast and exact.

A square of ``fill`` slides over the image; for each position we record the probability of
the target class, the most probable class, and optionally the total activation of one
feature map. The occluded copies run in chunks (bounded memory for any grid), and the early
layers are recomputed only where the square can reach them (incremental inference, see
``convscope.methods._incremental``); the result equals a plain full recomputation up to float
summation order (~1e-6).

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

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from convscope.errors import BadArgument
from convscope.methods import _incremental as inc
from convscope.methods._common import ModelLike, prepare
from convscope.methods.targets import TargetLike, resolve_targets, target_labels
from convscope.probes.hooks import eval_mode
from convscope.probes.layers import resolve_layer
from convscope.types import Renderable

FILL_COLOURS = {"grey": 0.5, "gray": 0.5, "black": 0.0, "white": 1.0}
MODES = ("exact", "approximate", "full")
# Memory for the chain outputs gathered before the rest of the network runs on them at once.
SUFFIX_BUDGET_BYTES = 128 * 2**20


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
    """

    mode: str
    incremental_layers: tuple[str, ...]
    work_fraction: float
    copies: int
    precision: str = "float32"
    fallback: str = ""


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


def grid_origins(size: int, window: int, stride: int, cover_border: bool = False) -> tuple[int, ...]:
    """Top (or left) pixels of the window positions along an axis of ``size`` pixels."""
    count = (size - window) // stride + 1
    if cover_border:
        count = math.ceil((size - window) / stride) + 1
    return tuple(i * stride for i in range(count))


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


class _Reducer:
    """Per occluded copy: target probability, top class and probability, channel total."""

    def __init__(self, total: int) -> None:
        self.probability = torch.empty(total)
        self.top_class = torch.empty(total, dtype=torch.int64)
        self.top_probability = torch.empty(total)

    def add(self, flat: list[int], logits: torch.Tensor, target: int) -> None:
        probs = torch.softmax(logits.float(), dim=1)
        top = probs.max(dim=1)
        self.probability[flat] = probs[:, target].cpu()
        self.top_class[flat] = top.indices.cpu()
        self.top_probability[flat] = top.values.cpu()


def _channel_sum_hook(store: list[torch.Tensor], channel: list[int]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            if channel:
                store.append(output[:, channel[0]].float().sum(dim=(1, 2)))
            else:
                store.append(output.float().sum(dim=(2, 3)))
        else:
            store.append(torch.empty(0))

    return hook


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
            module path); ``channel`` picks it (default: the strongest on the clean image).
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
            or a layer without ``(N, C, H, W)`` output.
        BadTarget: unknown class index or label.
        UnknownLayer: a layer name that does not resolve.
    """
    loaded, batch = prepare(model, images, target=target)
    count, channels, height, width = batch.shape
    _check_settings(window, stride, height, width, batch_size, mode)
    pre = loaded.preprocess
    fill_values = resolve_fill(fill, pre.mean, pre.std, channels)
    layer_module = resolve_layer(loaded, layer)[1] if layer is not None else None
    rows = grid_origins(height, window, stride, cover_border)
    cols = grid_origins(width, window, stride, cover_border)
    module = loaded.module
    low = _low_precision(batch.device) if mode == "approximate" else None
    fallback = ""
    if mode == "approximate" and low is None:
        fallback = f"{batch.device.type} has no fast bfloat16/float16 arithmetic: ran exact (float32)"
    network, full_precision = module, batch
    if low is not None:
        # A half-precision twin; the caller's model is untouched. The layer is found in it
        # by its path.
        network = copy.deepcopy(module).to(low)
        with eval_mode(module), eval_mode(network), torch.no_grad():
            ratio = _speedup(module, network, batch[:1], low, min(batch_size, APPROXIMATE_PROBE_COPIES))
        if ratio < APPROXIMATE_MIN_SPEEDUP:
            fallback = (f"{str(low).removeprefix('torch.')} measured {ratio:.2f}x the float32 speed on this model and machine "
                        f"(needs {APPROXIMATE_MIN_SPEEDUP:g}x): ran exact (float32)")
            network, low = module, None
    if low is not None:
        if layer_module is not None:
            layer_module = network.get_submodule(next(p for p, m in module.named_modules() if m is layer_module))
        batch = batch.to(low)
    fill_tensor = torch.tensor(fill_values, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)

    outputs: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("probability", "top_class", "top_probability", "activation")
    }
    clean_probability, chosen_channels, clean_activation = [], [], []
    stats: list[tuple[str, tuple[str, ...], float]] = []
    # no_grad, not inference_mode: the chain analysis follows tensors by version counter.
    with eval_mode(module), eval_mode(network), torch.no_grad():
        # The first image's recorded pass doubles as its clean pass (one forward fewer).
        # (The chain analysis follows tensors by identity: record the very tensor occluded.)
        image = batch[:1]
        first = [_record(network, image, layer_module)]  # handed over (and dropped) at n = 0
        if low is None:
            rest = [module(part) for part in torch.split(batch[1:], batch_size)] if count > 1 else []
            clean_logits = torch.cat([first[0][0].logits, *rest])
        else:  # the explained class is the float32 network's
            clean_logits = torch.cat([module(part) for part in torch.split(full_precision, batch_size)])
        targets = resolve_targets(target, clean_logits, loaded.categories, loaded.name)
        for n in range(count):
            image = image if n == 0 else batch[n : n + 1]
            recorded = first.pop() if first else _record(network, image, layer_module)
            result = _occlude_one(
                network, image, recorded, int(targets[n]), rows, cols, window, fill_tensor, layer,
                layer_module, channel, batch_size, "full" if mode == "full" else "exact", progress,
            )
            del recorded
            for key, collected in outputs.items():
                collected.append(result[key])
            clean_probability.append(result["clean_probability"])
            chosen_channels.append(result["channel"])
            clean_activation.append(result["clean_activation"])
            stats.append(result["stats"])

    shape = (count, len(rows), len(cols))
    probability = torch.stack(outputs["probability"]).view(shape)
    clean = torch.stack(clean_probability)
    drop = clean.view(-1, 1, 1) - probability
    top_class = torch.stack(outputs["top_class"]).view(shape)
    classes = sorted(set(top_class.unique().tolist()) | set(targets.tolist()))
    names = target_labels(torch.tensor(classes, dtype=torch.int64), loaded.categories)
    mode_used = "incremental" if all(s[0] == "incremental" for s in stats) else "full"
    return OcclusionResult(
        targets=targets.cpu(),
        labels=target_labels(targets.cpu(), loaded.categories),
        clean_probability=clean,
        probability=probability,
        drop=drop,
        top_class=top_class,
        top_probability=torch.stack(outputs["top_probability"]).view(shape),
        pixel_drop=_pixel_map(drop, rows, cols, window, height, width),
        layer=layer,
        channels=torch.tensor(chosen_channels, dtype=torch.int64) if layer is not None else None,
        activation=torch.stack(outputs["activation"]).view(shape) if layer is not None else None,
        clean_activation=torch.tensor(clean_activation) if layer is not None else None,
        row_origins=rows,
        col_origins=cols,
        window=window,
        stride=stride,
        fill=fill_values,
        class_names=dict(zip(classes, names, strict=True)),
        stats=OcclusionStats(
            mode=mode_used,
            incremental_layers=stats[0][1] if stats else (),
            work_fraction=sum(s[2] for s in stats) / max(1, len(stats)),
            precision=str(batch.dtype).removeprefix("torch."),
            copies=count * len(rows) * len(cols),
            fallback=fallback,
        ),
    )


def _input_patches(
    image: torch.Tensor, fill: torch.Tensor, tops: Sequence[int], lefts: Sequence[int],
    shift_rows: Sequence[int], shift_cols: Sequence[int], window: int,
) -> torch.Tensor:
    """``(B, C, window, window)`` input patches: the square's fill, except where a clipped
    border window was shifted inside the image (``shift`` > 0): there the photo shows."""
    count, channels = len(tops), image.shape[1]
    patches = fill.to(image.dtype).view(1, channels, 1, 1).expand(count, channels, window, window)
    if not any(shift_rows) and not any(shift_cols):
        return patches.contiguous()
    windows = image[0].unfold(1, window, 1).unfold(2, window, 1)  # (C, H', W', window, window)
    photo = windows[:, list(tops), list(lefts)].permute(1, 0, 2, 3)  # (B, C, window, window)
    offsets = torch.arange(window, device=image.device)
    inside = (offsets[None, :, None] >= torch.as_tensor(list(shift_rows), device=image.device)[:, None, None]) & (
        offsets[None, None, :] >= torch.as_tensor(list(shift_cols), device=image.device)[:, None, None]
    )
    return torch.where(inside[:, None], patches, photo).contiguous()


# Approximate mode keeps half precision only when a short probe shows it pays: a forward of
# this many copies in each precision (best of two), before any occluded copy runs.
APPROXIMATE_PROBE_COPIES = 4
APPROXIMATE_MIN_SPEEDUP = 1.15


def _speedup(module: torch.nn.Module, twin: torch.nn.Module, image: torch.Tensor, low: torch.dtype, copies: int) -> float:
    """float32 time / ``low`` time of one forward of ``copies`` copies of ``image`` (best of two
    each; the first calls also warm up the kernels). Small networks and CPUs whose bfloat16 is
    emulated come out below 1."""
    import time

    full = image.expand(copies, *image.shape[1:]).contiguous()
    half = full.to(low)

    def best(network: torch.nn.Module, x: torch.Tensor) -> float:
        network(x)  # warm-up: first calls pick kernels and allocate
        times = []
        for _ in range(2):
            start = time.perf_counter()
            network(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(module, full) / max(best(twin, half), 1e-9)


def _low_precision(device: torch.device) -> torch.dtype | None:
    """bfloat16 where this device computes it natively (else ``None``: stay exact)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):  # private probe; absent in some builds
            return None
    return None


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


def _record(
    module: torch.nn.Module, image: torch.Tensor, layer_module: torch.nn.Module | None
) -> tuple[inc.Recording, list[torch.Tensor]]:
    """The clean pass of one image, with every module call recorded, and the per-channel
    totals of ``layer_module`` when given."""
    sums: list[torch.Tensor] = []
    hooks = [(layer_module, _channel_sum_hook(sums, []))] if layer_module is not None else []
    return inc.record(module, image, hooks), sums


def _occlude_one(
    module: torch.nn.Module,
    image: torch.Tensor,
    recorded: tuple[inc.Recording, list[torch.Tensor]],
    target: int,
    rows: Sequence[int],
    cols: Sequence[int],
    window: int,
    fill: torch.Tensor,
    layer: str | None,
    layer_module: torch.nn.Module | None,
    channel: int | None,
    batch_size: int,
    mode: str,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    height, width = image.shape[-2:]
    recording, sums = recorded
    clean_probs = torch.softmax(recording.logits.float(), dim=1)[0]

    chosen = None
    clean_total = 0.0
    if layer_module is not None:
        if not sums or sums[-1].numel() == 0:
            raise BadArgument(f"--layer {layer}", "has no (N, C, H, W) feature-map output", "pick a convolutional layer")
        per_channel = sums[-1][0]
        if channel is None:
            chosen = int(per_channel.argmax())
        elif isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < per_channel.numel():
            raise BadArgument(f"--channel {channel}", f"is not a channel of {layer} (0..{per_channel.numel() - 1})")
        else:
            chosen = channel
        clean_total = float(per_channel[chosen])

    # Every copy's input patch: the window's rows/columns, shifted inside the image when a
    # clipped border window would leave it (the extra cells are unoccluded, hence exact).
    patch_rows = [min(r, height - window) for r in rows]
    patch_cols = [min(c, width - window) for c in cols]
    units = inc.leading_chain(recording, image) if mode == "exact" else []
    chain = _choose_chain(module, recording, image, units, patch_rows, patch_cols, window, layer_module)
    total_macs = sum(recording.macs.values())
    recording.release()  # it holds every clean activation
    del units

    reducer = _Reducer(len(rows) * len(cols))
    watch_values: list[tuple[list[int], torch.Tensor]] = []  # (flat indices, totals)
    watch_sums: list[torch.Tensor] = []
    hooks_suffix = []
    watch = chain.watch if chain is not None else None
    if layer_module is not None and watch is None and chosen is not None:
        hooks_suffix = [layer_module.register_forward_hook(_channel_sum_hook(watch_sums, [chosen]))]
    macs_spent = 0.0
    # The part after the chain runs on several chunks at once (bigger matrix products for
    # the classifier), as many as fit in SUFFIX_BUDGET_BYTES of materialised activations.
    pending: list[tuple[list[int], torch.Tensor]] = []
    suffix_batch = chain.suffix_batch(len(rows) * len(cols), batch_size) if chain is not None else batch_size

    def run_suffix() -> None:
        assert chain is not None
        flat = [k for part_flat, _ in pending for k in part_flat]
        full = pending[0][1] if len(pending) == 1 else torch.cat([f for _, f in pending])
        pending.clear()
        with inc.replayed(module, chain.units) as replay:
            replay.value = full
            logits = module(image.expand(len(flat), -1, -1, -1))
        collect(flat, logits)

    def collect(flat: list[int], logits: torch.Tensor) -> None:
        reducer.add(flat, logits, target)
        if watch_sums:  # the layer's hook fired during that pass
            watch_values.append((flat, watch_sums.pop()))

    try:
        for part, row_plan, col_plan in _chunks(chain, len(rows), len(cols), batch_size):
            ri = [i for i, _ in part]
            ci = [j for _, j in part]
            flat = [i * len(cols) + j for i, j in part]
            if chain is None or row_plan is None or col_plan is None:
                copies = image.expand(len(part), -1, -1, -1).clone()
                for b, (i, j) in enumerate(part):
                    copies[b, :, rows[i] : rows[i] + window, cols[j] : cols[j] + window] = fill
                collect(flat, module(copies))
                macs_spent += len(part) * total_macs
            else:
                patch = _input_patches(image, fill, [patch_rows[i] for i in ri], [patch_cols[j] for j in ci],
                                       [rows[i] - patch_rows[i] for i in ri], [cols[j] - patch_cols[j] for j in ci], window)
                last, watched = inc.propagate(
                    chain.units, chain.clean, row_plan, col_plan, patch, ri, ci,
                    [patch_rows[i] for i in ri], [patch_cols[j] for j in ci], watch,
                )
                if watched is not None and chosen is not None:
                    totals = chain.watched_totals(watched, row_plan, col_plan, ri, ci, chosen, clean_total)
                    watch_values.append((flat, totals))
                pending.append((flat, inc.materialize(
                    chain.clean, last, [row_plan[-1].start[i] for i in ri], [col_plan[-1].start[j] for j in ci]
                )))
                if sum(len(f) for f, _ in pending) >= suffix_batch:
                    run_suffix()
                macs_spent += len(part) * chain.macs_per_copy(row_plan, col_plan, total_macs)
            if progress is not None:
                progress(len(part))
        if pending:
            run_suffix()
    finally:
        for handle in hooks_suffix:
            handle.remove()

    activation = None
    if layer_module is not None:
        activation = torch.empty(len(rows) * len(cols))
        for flat, totals in watch_values:
            activation[flat] = totals.float().cpu()
    return {
        "probability": reducer.probability,
        "top_class": reducer.top_class,
        "top_probability": reducer.top_probability,
        "activation": activation,
        "clean_probability": clean_probs[target].cpu(),
        "channel": chosen,
        "clean_activation": clean_total,
        "stats": (
            "incremental" if chain is not None else "full",
            tuple(u.path for u in chain.units) if chain is not None else (),
            macs_spent / (len(rows) * len(cols) * total_macs) if total_macs > 0 else 1.0,
        ),
    }


@dataclass
class _Chain:
    """The verified incremental chain for one image."""

    units: list[inc.Unit]
    clean: inc.CleanPass
    row_extents: list[inc.Extents]
    col_extents: list[inc.Extents]
    patch_rows: list[int]
    patch_cols: list[int]
    window: int
    watch: int | None  # unit whose output is the requested layer's

    def plan(self, axis: int, members: Sequence[int]) -> list[inc.AxisPlan]:
        extents, starts = (self.row_extents, self.patch_rows) if axis == 0 else (self.col_extents, self.patch_cols)
        return inc.plan_chunk(self.units, axis, extents, starts, self.window, members)

    def spatial_extents(self, axis: int) -> tuple[list[inc.Extents], list[float]]:
        """Extents of the units that move cells (windows, blocks) and their weights for
        ``inc.bands``: multiply-adds per output cell (at least 1, so pools count) times the
        mean extent along the other axis."""
        extents, other = (self.row_extents, self.col_extents) if axis == 0 else (self.col_extents, self.row_extents)
        chosen = [k for k, u in enumerate(self.units) if u.kind in ("window", "block")]
        weights = [
            max(1, self.units[k].macs_per_cell) * sum(other[k].size) / max(1, len(other[k].size)) for k in chosen
        ]
        return [extents[k] for k in chosen], weights

    def watched_totals(
        self, patches: torch.Tensor, rows: Sequence[inc.AxisPlan], cols: Sequence[inc.AxisPlan],
        ri: Sequence[int], ci: Sequence[int], channel: int, clean_total: float,
    ) -> torch.Tensor:
        """Total activation of ``channel`` per copy: clean total + (patch - clean patch) sums."""
        assert self.watch is not None
        rp, cp = rows[self.watch], cols[self.watch]
        clean = self.clean.outputs[self.watch][0, channel].double()
        changed = patches[:, channel].double().sum(dim=(1, 2))
        before = torch.stack([
            clean[rp.start[i] : rp.start[i] + rp.size, cp.start[j] : cp.start[j] + cp.size].sum()
            for i, j in zip(ri, ci, strict=True)
        ])
        return (clean_total + changed - before.to(changed.device)).float()

    def suffix_batch(self, copies: int, batch_size: int) -> int:
        """Copies per run of the network after the chain: as many as ``SUFFIX_BUDGET_BYTES``
        of the chain's output allow (at least ``batch_size``), split evenly over the runs."""
        last = self.clean.outputs[-1]
        per_copy = last[0].numel() * last.element_size()
        cap = max(batch_size, SUFFIX_BUDGET_BYTES // max(1, per_copy))
        runs = math.ceil(copies / cap)
        return max(1, math.ceil(copies / runs))

    def macs_per_copy(self, rows: Sequence[inc.AxisPlan], cols: Sequence[inc.AxisPlan], total_macs: int) -> float:
        full = computed = 0
        for unit, rp, cp in zip(self.units, rows, cols, strict=True):
            full += unit.macs_per_cell * unit.axes[0].size_out * unit.axes[1].size_out
            if unit.kind == "block":
                area = math.ceil(rp.length / unit.axes[0].stride) * math.ceil(cp.length / unit.axes[1].stride)
            else:
                area = rp.size * cp.size
            computed += unit.macs_per_cell * area
        return total_macs - full + computed


def _chunks(
    chain: _Chain | None, rows: int, cols: int, batch_size: int
) -> Iterator[tuple[list[tuple[int, int]], list[inc.AxisPlan] | None, list[inc.AxisPlan] | None]]:
    """Copies in chunks of at most ``batch_size``; with a chain, one row band x one column
    band each, bands grouping positions whose changed regions are about the same size."""
    if chain is None:
        positions = [(i, j) for i in range(rows) for j in range(cols)]
        for offset in range(0, len(positions), batch_size):
            yield positions[offset : offset + batch_size], None, None
        return
    band = max(1, math.isqrt(batch_size))
    row_bands = inc.bands(*chain.spatial_extents(0), rows, band)
    col_bands = inc.bands(*chain.spatial_extents(1), cols, max(1, batch_size // band))
    col_plans = [chain.plan(1, members) for members in col_bands]
    for row_members in row_bands:
        row_plan = chain.plan(0, row_members)
        for col_members, col_plan in zip(col_bands, col_plans, strict=True):
            yield [(i, j) for i in row_members for j in col_members], row_plan, col_plan


def _choose_chain(
    module: torch.nn.Module,
    recording: inc.Recording,
    image: torch.Tensor,
    units: list[inc.Unit],
    patch_rows: list[int],
    patch_cols: list[int],
    window: int,
    layer_module: torch.nn.Module | None,
) -> _Chain | None:
    """Cut the chain where recomputing patches stops paying, check it on the clean image,
    and return it (or ``None``: plain batched recomputation)."""
    if not units:
        return None
    layer_key = None
    if layer_module is not None:
        call = recording.outputs.get(id(layer_module))
        if call is not None:
            layer_key = (id(call.output), call.output_version)
        for index, unit in enumerate(units):
            # A layer inside a block is computed in the swapped-out part: stop before it.
            if any(sub is layer_module for sub in unit.module.modules()) and unit.output_key != layer_key:
                units = units[:index]
                break
    row_extents = inc.true_extents(units, 0, patch_rows, window)
    col_extents = inc.true_extents(units, 1, patch_cols, window)
    end = -1
    for index, unit in enumerate(units):
        # A pool (no multiply-adds) costs about the same either way, and computing it here
        # shrinks what is pasted into whole maps afterwards: only units with work can cut.
        if unit.kind in ("window", "block") and unit.macs_per_cell > 0:
            rows, cols = row_extents[index].size, col_extents[index].size
            fraction = (sum(rows) / len(rows)) * (sum(cols) / len(cols)) / (unit.axes[0].size_out * unit.axes[1].size_out)
            if fraction > inc.FULL_RECOMPUTE_FRACTION:
                break
        end = index
    if end < 0:
        return None
    units = units[: end + 1]
    chain = _Chain(units, None, row_extents[: end + 1], col_extents[: end + 1], patch_rows, patch_cols, window, None)  # type: ignore[arg-type]
    rows_all, cols_all = chain.plan(0, range(len(patch_rows))), chain.plan(1, range(len(patch_cols)))
    clean, trusted = inc.run_clean(units, image)
    for index, unit in enumerate(units[:trusted]):
        if unit.kind == "block" and not inc.check_block(unit, clean, index, rows_all[index], cols_all[index]):
            trusted = index
            break
    # Check the swap itself: replaying the clean activation must give the clean logits even
    # when the model is fed noise. A chain tensor read elsewhere (a skip connection) or the
    # input read outside the chain would show up here.
    end = trusted - 1
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(0)).to(image)
    for _ in range(8):
        if end < 0:
            return None
        with inc.replayed(module, units[: end + 1]) as replay:
            replay.value = clean.outputs[end].clone()
            logits = module(noise)
        if inc.close(logits, recording.logits):
            break
        end -= 1
    else:
        return None
    watch = None
    if layer_key is not None:
        watch = next((i for i, u in enumerate(units[: end + 1]) if u.output_key == layer_key), None)
    return _Chain(
        units[: end + 1],
        inc.CleanPass(clean.inputs[: end + 1], clean.canvases[: end + 1], clean.outputs[: end + 1]),
        row_extents[: end + 1],
        col_extents[: end + 1],
        patch_rows,
        patch_cols,
        window,
        watch,
    )
