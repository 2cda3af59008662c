"""Deconvnet projections (Zeiler & Fergus 2014, section 2.1).

To see what a feature map responds to, keep one activation of it (or the whole map), set
every other activation of the layer to zero, and project it back to pixels: unpool with the
max-pool switches recorded in the forward pass, rectify, filter with the transposed kernels,
down to the input.

Each of those steps is the backward pass of the forward layer with one change: the ReLU's
backward rectifies the signal (``relu(g)``) instead of masking it with the forward input. So
the projection is the input gradient of the kept activation under the deconvnet rule
(``probes.relu_rules``), which is captum's ``NeuronDeconvolution``; the tests check it against an
explicit unpool/rectify/transposed-conv deconvnet on AlexNet. On plain conv/pool/ReLU stacks
(AlexNet, ZFNet, VGG, the small variants) this *is* the paper's deconvnet. For networks with
BatchNorm, residual additions or depthwise convolutions (ResNet, EfficientNet) the paper defines
no inverse; the backward-rule formulation is used there (BatchNorm and the additions pass the
signal as their gradients do), and ZFNet's contrast normalisation likewise passes its gradient.
Where pooling windows overlap (AlexNet's 3x3 stride 2) two windows can share a switch; their
signals add up, as in the gradient. ReLU6 is a ReLU followed by a clip (``probes.relu_rules``).
On a network without rectifiers (GELU, SiLU: ConvNeXt, EfficientNet) the rule has nothing to act
on and a projection is the plain gradient of the activation: the result says so (``rules``, one
warning line) instead of refusing.

Only the part of the network up to the layer runs (see ``_UpToLayer``), and the receptive
fields used to crop come from the same pass. The layer is read through its measured layout
(``probes.layers.map_layer``): an NHWC map or tokens on a grid is projected from its
``(N, C, h, w)`` view, a layer that is not a map is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from convscope.errors import BadArgument
from convscope.methods._common import ModelLike, prepare
from convscope.methods.gradcam import feature_map_of
from convscope.methods.guided import graph_forward, rule_warnings
from convscope.methods.results import DeconvProjections
from convscope.probes.geometry import cell_box, known_geometry, layer_geometry, remember_geometry, trace
from convscope.probes.hooks import Capture, StopForward, capture, stop_after
from convscope.probes.layers import map_layer

LOCATIONS = ("max", "all")


class _UpToLayer(nn.Module):
    """Runs ``inner`` with grad enabled and stops once the layer is done.

    ``geometry.trace`` runs its model under ``no_grad``; wrapping the network lets the
    receptive-field trace ride on the deconvnet's own forward pass instead of a second one.
    The pass stops when the top-level block holding the layer returns (after the layer ran):
    a module may be called again by its own block (ResNet's ReLU), never after its block has
    returned, in networks that call each top-level block once. A layer that is itself a
    top-level module may be called from anywhere, so then the pass runs to the end.
    """

    def __init__(self, inner: nn.Module, path: str, store: Capture[torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.path = path
        self.store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        head, _, rest = self.path.partition(".")
        block = self.inner.get_submodule(head) if rest else None

        # once the layer has run, the rest of the network (the classifier) is not needed
        stopping: AbstractContextManager[None] = (
            stop_after(block, lambda: bool(self.store.outputs.get(self.path))) if block is not None else nullcontext())
        try:
            with stopping, torch.enable_grad():
                return self.inner(x)
        except StopForward:
            return None


def _chosen_channels(
    channel: int | Sequence[int] | None, top: int, peaks: torch.Tensor, name: str
) -> torch.Tensor:
    count, channels = peaks.shape
    if channel is None:
        return peaks.topk(min(top, channels), dim=1).indices
    wanted = [channel] if isinstance(channel, int) else list(channel)
    if not wanted:
        raise BadArgument("--channel", "give at least one channel")
    for c in wanted:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < channels:
            raise BadArgument(
                f"--channel {c}", f"is out of range: layer {name} has {channels} channels (0..{channels - 1})"
            )
    return torch.tensor(wanted, dtype=torch.int64, device=peaks.device).expand(count, -1)


def deconv(
    model: ModelLike,
    images: Any,
    layer: str,
    channel: int | Sequence[int] | None = None,
    top: int = 9,
    location: str = "max",
    *,
    progress: Callable[[int], None] | None = None,
) -> DeconvProjections:
    """Project feature maps of ``layer`` down to pixels with the deconvnet.

    Args:
        model: a ``LoadedModel`` or any ``nn.Module`` (the rule acts on its ReLU/ReLU6; see
            ``rules`` in the result for what it reached).
        images: PIL image(s), converted with the model's preprocessing, or a normalised
            ``(N, C, H, W)`` float tensor; paths, numpy arrays and ``None`` are refused
            with ``BadInputType`` (see ``convscope.validate``).
        layer: alias or module path. A module called more than once per forward pass (ResNet's
            block ReLU) counts at its last call.
        channel: one channel or a list (the same for every image); ``None``: each image's
            ``top`` channels with the largest activation.
        top: how many channels when ``channel`` is ``None``.
        location: ``"max"`` keeps only the channel's strongest activation (the paper's
            figures); ``"all"`` keeps its whole feature map.
        progress: called with ``1`` after each projection (``K`` in all).

    Returns:
        ``DeconvProjections`` with ``(N, K, C, H, W)`` projections, the activation value, its
        cell and the input box it sees, for cropping; ``rules`` says which activations got the
        deconvnet rule (none: the projections are plain gradients, and a warning says so).

    Raises:
        UnknownLayer: no such layer, or its output (its measured layout) is not a feature map.
        BadArgument: bad channel, top or location.
    """
    if location not in LOCATIONS:
        raise BadArgument(f"--location {location}", "must be 'max' or 'all'")
    if channel is None and top < 1:
        raise BadArgument(f"--top {top}", "must be at least 1")
    loaded, batch = prepare(model, images, whole_network=False)
    mapped = map_layer(loaded, layer, batch.shape[1:])
    path = mapped.path
    shape = tuple(batch.shape[1:])
    known = known_geometry(loaded.module, shape, path)
    with graph_forward(loaded, batch, "deconvnet") as (x, state, stack):
        store = stack.enter_context(
            capture(loaded.module, {path: mapped.module}, mode="graph", layouts={path: mapped.layout}))
        runner = _UpToLayer(loaded.module, path, store)
        if known is None:
            calls = trace(runner, x)
        else:  # the field is known at this size: a plain forward, without the trace's per-op work
            runner(x)
            calls = []
    assert state is not None
    report = state.report()
    output = feature_map_of(store, path, layer)
    if not output.requires_grad:
        raise BadArgument(layer, "is detached from the input, so it cannot be projected")
    values_all = output.detach()
    count, _, height, width = values_all.shape
    peaks, where = values_all.flatten(2).max(dim=2)  # (N, C) each
    channels = _chosen_channels(channel, top, peaks, layer)
    values = peaks.gather(1, channels)
    flat_positions = where.gather(1, channels)
    rows = torch.arange(count, device=values_all.device)

    projections = []
    total = channels.shape[1]
    for k in range(total):
        seed = torch.zeros_like(values_all)
        if location == "max":
            seed.view(count, -1, height * width)[rows, channels[:, k], flat_positions[:, k]] = values[:, k]
        else:
            seed[rows, channels[:, k]] = values_all[rows, channels[:, k]]
        (grad,) = torch.autograd.grad(output, x, grad_outputs=seed, retain_graph=k < total - 1)
        projections.append(grad.float().cpu())
        if progress is not None:
            progress(1)

    positions = torch.stack([flat_positions // width, flat_positions % width], dim=-1).cpu()
    if known is None:
        traced = [c for c in calls if c.name == f"inner.{path}" or c.name.startswith(f"inner.{path}.")]
        geometry = traced[-1].geometry if traced else layer_geometry(loaded.module, batch[:1].detach(), path)
        remember_geometry(loaded.module, shape, path, geometry)
    else:
        geometry = known
    image_size = (int(batch.shape[-2]), int(batch.shape[-1]))
    boxes = torch.tensor(
        [
            [list(cell_box(geometry, int(r), int(c), image_size)) for r, c in per_image.tolist()]
            for per_image in positions
        ],
        dtype=torch.int64,
    ).view(count, total, 4)
    warnings = list(rule_warnings(report))
    silent = sorted({int(c) for c, v in zip(channels.flatten().tolist(), values.flatten().tolist()) if v == 0})
    if silent:
        warnings.append(
            f"{layer} channel {', '.join(map(str, silent))}: all zero in at least one image "
            "(the unit does not fire), so its projection there is empty"
        )
    return DeconvProjections(
        layer=layer,
        location=location,
        channels=channels.cpu(),
        projections=torch.stack(projections, dim=1),
        values=values.float().cpu(),
        positions=positions,
        boxes=boxes,
        boxes_exact=geometry.exact,
        grid=(height, width),
        warnings=tuple(warnings),
        rules=report,
        preprocess=loaded.preprocess,
    )


def project_cells(
    model: ModelLike, images: Any, layer: str, channels: torch.Tensor, cells: torch.Tensor
) -> torch.Tensor:
    """Deconvnet projection of one activation per image, each its own channel and cell.

    Row ``i`` keeps only ``layer[i, channels[i], cells[i, 0], cells[i, 1]]`` (its forward value)
    and projects it to pixels, as ``deconv(..., location="max")`` does for a channel's peak. All
    rows share one forward and one backward pass: images do not interact in eval mode.

    Args:
        images: PIL images or a normalised ``(N, C, H, W)`` tensor (repeats allowed).
        channels: ``(N,)`` int64 channel per image.
        cells: ``(N, 2)`` int64 ``(y, x)`` cell per image.

    Returns:
        ``(N, C, H, W)`` float32 projections on the CPU.

    Raises:
        UnknownLayer, BadArgument: as ``deconv`` (a network without rectifiers gives plain
        gradients, as there).
    """
    loaded, batch = prepare(model, images)
    mapped = map_layer(loaded, layer, batch.shape[1:])
    path = mapped.path
    with graph_forward(loaded, batch, "deconvnet") as (x, state, stack):
        store = stack.enter_context(
            capture(loaded.module, {path: mapped.module}, mode="graph", layouts={path: mapped.layout}))
        _UpToLayer(loaded.module, path, store)(x)
    assert state is not None
    output = feature_map_of(store, path, layer)
    if not output.requires_grad:
        raise BadArgument(layer, "is detached from the input, so it cannot be projected")
    rows = torch.arange(output.shape[0], device=output.device)
    channels = channels.to(output.device)
    ys, xs = cells[:, 0].to(output.device), cells[:, 1].to(output.device)
    seed = torch.zeros_like(output)
    seed[rows, channels, ys, xs] = output.detach()[rows, channels, ys, xs]
    (grad,) = torch.autograd.grad(output, x, grad_outputs=seed)
    return grad.float().cpu()
