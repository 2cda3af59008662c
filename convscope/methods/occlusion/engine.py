"""The per-image engine: every occluded copy of one image, in chunks.

``occlude_image`` takes one image's recorded clean pass (``units.record``), chooses its
incremental chain (``chain.choose_chain``; none in full mode or where the network allows none)
and runs the grid of occluded copies chunk by chunk: with a chain, each chunk's patches are
carried through it (``replay.propagate``), pasted into the chain's clean output and the rest of
the network runs on several chunks at once; without one, whole occluded copies run through the
whole network. It returns the flat per-copy values as an ``ImageOcclusion``; the public
``occlusion`` stacks them into maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from convscope.errors import BadArgument, ConvscopeError
from convscope.methods.occlusion.chain import Chain, choose_chain, chunks
from convscope.methods.occlusion.replay import materialize, propagate, replayed
from convscope.methods.occlusion.units import Recording, channel_totals, check_scores, leading_chain
from convscope.probes.hooks import reduce_outputs

if TYPE_CHECKING:
    from convscope.probes.layout import Layout


@dataclass(frozen=True)
class ImageOcclusion:
    """The occluded copies of one image, flat over the grid of positions (row-major).

    Attributes:
        probability: ``(rows * cols,)`` float32 target probability with the square at each
            position; ``top_class`` (int64) and ``top_probability`` (float32) the most probable
            class there and its probability.
        activation: ``(rows * cols,)`` float32 total activation of the watched channel, or
            ``None`` without a layer.
        clean_probability: ``()`` float32 target probability without the square.
        channel: the watched channel (``None`` without a layer); ``clean_activation`` its total
            without the square (0.0 without a layer).
        mode: ``"incremental"`` or ``"full"``; ``incremental_layers`` the chain's module paths.
        work_fraction: multiply-adds spent per copy as a fraction of a full forward pass.
        note: why the incremental plan was cut short or not used although the mode allowed it
            (it did not fit the model), else ``""``.
    """

    probability: torch.Tensor
    top_class: torch.Tensor
    top_probability: torch.Tensor
    activation: torch.Tensor | None
    clean_probability: torch.Tensor
    channel: int | None
    clean_activation: float
    mode: str
    incremental_layers: tuple[str, ...]
    work_fraction: float
    note: str = ""


class _Reducer:
    """Per occluded copy: target probability, top class and probability."""

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


def _watched_channel(recording: Recording, layer: str | None, channel: int | None) -> tuple[int, float]:
    """The channel of the layer to watch (the strongest on the clean image unless given) and its
    total on the clean image. A reused module's value is its last call's (``Capture.last``)."""
    totals = recording.layer_totals
    if not totals or totals[-1].numel() == 0:
        raise BadArgument(f"--layer {layer}", "has no (N, C, H, W) feature-map output", "pick a convolutional layer")
    per_channel = totals[-1][0]
    if channel is None:
        chosen = int(per_channel.argmax())
    elif isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < per_channel.numel():
        raise BadArgument(f"--channel {channel}", f"is not a channel of {layer} (0..{per_channel.numel() - 1})")
    else:
        chosen = channel
    return chosen, float(per_channel[chosen])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def occlude_image(
    module: torch.nn.Module,
    image: torch.Tensor,
    recording: Recording,
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
    layout: Layout | None = None,
) -> ImageOcclusion:
    """Every occluded copy of ``image`` (``(1, C, H, W)``, the very tensor ``recording`` saw).

    Where the incremental plan does not fit the model (its checks fail, or it fails to run),
    every copy runs the whole network instead and ``note`` says why: the values are exact
    either way.

    Args:
        recording: the clean pass of ``image`` with the totals of ``layer_module``; released
            here once the chain is chosen (it holds every clean activation).
        mode: ``"exact"`` (incremental where the network allows it) or ``"full"``.
        layout: the layer's measured layout (``None``: NCHW); an NHWC or token layer is read
            as its ``(N, C, h, w)`` view (``layout.to_nchw``) by a hook after the chain.

    Raises:
        BadArgument: a layer without ``(N, C, H, W)`` output, or a channel it does not have.
    """
    height, width = image.shape[-2:]
    clean_probs = torch.softmax(recording.logits.float(), dim=1)[0]
    chosen, clean_total = None, 0.0
    if layer_module is not None:
        chosen, clean_total = _watched_channel(recording, layer, channel)

    # Every copy's input patch: the window's rows/columns, shifted inside the image when a
    # clipped border window would leave it (the extra cells are unoccluded, hence exact).
    patch_rows = [min(r, height - window) for r in rows]
    patch_cols = [min(c, width - window) for c in cols]
    chain: Chain | None = None
    note = ""
    if mode == "exact":
        try:
            units = leading_chain(recording, image)
            nchw = layout is None or layout.kind == "NCHW"
            chain, note = choose_chain(module, recording, image, units, patch_rows, patch_cols, window, layer_module, nchw)
        except ConvscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plan it cannot prove is no plan: run every copy whole
            chain, note = None, (f"incremental occlusion does not fit this model ({_first_line(exc)}): every copy ran "
                                 "the whole network")
    total_macs = sum(recording.macs.values())
    recording.release()

    run = _Run(module, image, target, rows, cols, window, fill, layer, layer_module, chosen, clean_total, patch_rows,
               patch_cols, batch_size, progress, layout)
    if chain is not None:
        try:
            run.grid(chain, total_macs)
        except ConvscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the plan passed its checks but fails on a chunk: run whole
            note = (f"incremental occlusion failed on this model ({_first_line(exc)}): every copy ran the whole "
                    "network")
            chain = None
            run.reset()
    if chain is None:
        run.grid(None, total_macs)

    activation = None
    if layer_module is not None:
        activation = torch.empty(len(rows) * len(cols))
        for flat, totals in run.watch_values:
            activation[flat] = totals.float().cpu()
    return ImageOcclusion(
        probability=run.reducer.probability,
        top_class=run.reducer.top_class,
        top_probability=run.reducer.top_probability,
        activation=activation,
        clean_probability=clean_probs[target].cpu(),
        channel=chosen,
        clean_activation=clean_total,
        mode="incremental" if chain is not None else "full",
        incremental_layers=tuple(u.path for u in chain.units) if chain is not None else (),
        work_fraction=run.macs_spent / (len(rows) * len(cols) * total_macs) if total_macs > 0 else 1.0,
        note=note,
    )


class _Run:
    """The grid of occluded copies of one image, computed chunk by chunk (``grid``)."""

    def __init__(
        self, module: torch.nn.Module, image: torch.Tensor, target: int, rows: Sequence[int], cols: Sequence[int],
        window: int, fill: torch.Tensor, layer: str | None, layer_module: torch.nn.Module | None, chosen: int | None,
        clean_total: float,
        patch_rows: list[int], patch_cols: list[int], batch_size: int, progress: Callable[[int], None] | None,
        layout: Layout | None,
    ) -> None:
        self.module, self.image, self.rows, self.cols, self.window, self.fill = module, image, rows, cols, window, fill
        self.target, self.layer_name = target, layer
        self.layer_module, self.chosen, self.clean_total = layer_module, chosen, clean_total
        self.patch_rows, self.patch_cols, self.batch_size, self.layout = patch_rows, patch_cols, batch_size, layout
        self._progress, self._reported, self._done = progress, 0, 0
        self.reset()

    def reset(self) -> None:
        """Forget every copy computed (a second attempt reports progress only past the first's)."""
        self.reducer = _Reducer(len(self.rows) * len(self.cols))
        self.watch_values: list[tuple[list[int], torch.Tensor]] = []  # (flat indices, totals)
        self.macs_spent = 0.0
        self._done = 0

    def _advance(self, copies: int) -> None:
        self._done += copies
        if self._progress is not None and self._done > self._reported:
            self._progress(self._done - self._reported)
            self._reported = self._done

    def grid(self, chain: Chain | None, total_macs: int) -> None:
        """Every copy: with ``chain``, its patches carried through it and pasted into its clean
        output, the rest of the network on several chunks at once; without, whole copies."""
        module, image, rows, cols, window, fill = self.module, self.image, self.rows, self.cols, self.window, self.fill
        chosen, batch_size = self.chosen, self.batch_size
        watch = chain.watch if chain is not None else None
        # Without a chain unit to read it from, the layer's totals come from a hook in the passes.
        hooked: Mapping[str, torch.nn.Module] = {}
        if self.layer_module is not None and watch is None and chosen is not None:
            hooked = {"layer": self.layer_module}
        # The part after the chain runs on several chunks at once (bigger matrix products for
        # the classifier), as many as fit in SUFFIX_BUDGET_BYTES of materialised activations.
        pending: list[tuple[list[int], torch.Tensor]] = []
        suffix_batch = chain.suffix_batch(len(rows) * len(cols), batch_size) if chain is not None else batch_size

        layouts = {"layer": self.layout} if hooked else None
        with reduce_outputs(module, hooked, channel_totals(chosen), layouts) as watch_sums:

            def collect(flat: list[int], logits: object) -> None:
                self.reducer.add(flat, check_scores(logits, len(flat)), self.target)
                calls = watch_sums.outputs.get("layer")
                if calls:  # the layer's hook fired during that pass: its last call is its value
                    last = calls[-1]
                    calls.clear()
                    if last.numel() != len(flat):
                        raise BadArgument(f"--layer {self.layer_name}", "changed shape between the clean and the occluded passes")
                    self.watch_values.append((flat, last))

            def run_suffix() -> None:
                assert chain is not None
                flat = [k for part_flat, _ in pending for k in part_flat]
                full = pending[0][1] if len(pending) == 1 else torch.cat([f for _, f in pending])
                pending.clear()
                with replayed(module, chain.units) as replay:
                    replay.value = full
                    logits = module(image.expand(len(flat), -1, -1, -1))
                collect(flat, logits)

            for part, row_plan, col_plan in chunks(chain, len(rows), len(cols), batch_size):
                ri = [i for i, _ in part]
                ci = [j for _, j in part]
                flat = [i * len(cols) + j for i, j in part]
                if chain is None or row_plan is None or col_plan is None:
                    copies = image.expand(len(part), -1, -1, -1).clone()
                    for b, (i, j) in enumerate(part):
                        copies[b, :, rows[i] : rows[i] + window, cols[j] : cols[j] + window] = fill
                    collect(flat, module(copies))
                    self.macs_spent += len(part) * total_macs
                else:
                    patch_rows, patch_cols = self.patch_rows, self.patch_cols
                    patch = _input_patches(image, fill, [patch_rows[i] for i in ri], [patch_cols[j] for j in ci],
                                           [rows[i] - patch_rows[i] for i in ri], [cols[j] - patch_cols[j] for j in ci],
                                           window)
                    last, watched = propagate(
                        chain.units, chain.clean, row_plan, col_plan, patch, ri, ci,
                        [patch_rows[i] for i in ri], [patch_cols[j] for j in ci], watch,
                    )
                    if watched is not None and chosen is not None:
                        totals = chain.watched_totals(watched, row_plan, col_plan, ri, ci, chosen, self.clean_total)
                        self.watch_values.append((flat, totals))
                    pending.append((flat, materialize(
                        chain.clean, last, [row_plan[-1].start[i] for i in ri], [col_plan[-1].start[j] for j in ci]
                    )))
                    if sum(len(f) for f, _ in pending) >= suffix_batch:
                        run_suffix()
                    self.macs_spent += len(part) * chain.macs_per_copy(row_plan, col_plan, total_macs)
                self._advance(len(part))
            if pending:
                run_suffix()


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
