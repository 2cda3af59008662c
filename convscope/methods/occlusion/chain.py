"""The chain choice: how far along the leading chain the incremental computation goes.

``choose_chain`` cuts the leading chain of ``units.leading_chain`` where recomputing patches
stops paying (a unit whose changed region covers more than ``FULL_RECOMPUTE_FRACTION`` of its
map), then checks what is left on the clean image: window units against their modules, blocks
at three planned crops, and the swap itself (replaying the clean activation must give the
clean logits even when the model is fed noise). ``Chain`` holds the result for one image, with
its plans and costs; ``chunks`` splits the grid into chunks of one row band by one column band.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from convscope.methods.occlusion.plan import AxisPlan, Extents, bands, plan_chunk, true_extents
from convscope.methods.occlusion.replay import CleanPass, check_block, close, replayed, run_clean
from convscope.methods.occlusion.units import Recording, Unit

# Above this fraction of a map, pasting patches costs about what recomputing does: the chain
# stops there and the rest of the network runs in full (Krypton's switch-over).
FULL_RECOMPUTE_FRACTION = 0.6
# Memory for the chain outputs gathered before the rest of the network runs on them at once.
SUFFIX_BUDGET_BYTES = 128 * 2**20
# When the whole chain fails the swap check, at most this many more checks bisect for the longest
# prefix that passes (enough for 255 units).
SWAP_CHECKS = 8
# A chain cut short because the rest did not fit is kept only when it saves at least this
# fraction of a copy's multiply-adds; else every copy runs whole (no patching overhead).
MIN_SAVING_AFTER_MISFIT = 0.1


@dataclass
class Chain:
    """The verified incremental chain for one image."""

    units: list[Unit]
    clean: CleanPass
    row_extents: list[Extents]
    col_extents: list[Extents]
    patch_rows: list[int]
    patch_cols: list[int]
    window: int
    watch: int | None  # unit whose output is the requested layer's

    def plan(self, axis: int, members: Sequence[int]) -> list[AxisPlan]:
        extents, starts = (self.row_extents, self.patch_rows) if axis == 0 else (self.col_extents, self.patch_cols)
        return plan_chunk(self.units, axis, extents, starts, self.window, members)

    def spatial_extents(self, axis: int) -> tuple[list[Extents], list[float]]:
        """Extents of the units that move cells (windows, blocks) and their weights for
        ``bands``: multiply-adds per output cell (at least 1, so pools count) times the
        mean extent along the other axis."""
        extents, other = (self.row_extents, self.col_extents) if axis == 0 else (self.col_extents, self.row_extents)
        chosen = [k for k, u in enumerate(self.units) if u.kind in ("window", "block")]
        weights = [
            max(1, self.units[k].macs_per_cell) * sum(other[k].size) / max(1, len(other[k].size)) for k in chosen
        ]
        return [extents[k] for k in chosen], weights

    def watched_totals(
        self, patches: torch.Tensor, rows: Sequence[AxisPlan], cols: Sequence[AxisPlan],
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

    def macs_per_copy(self, rows: Sequence[AxisPlan], cols: Sequence[AxisPlan], total_macs: int) -> float:
        full = computed = 0
        for unit, rp, cp in zip(self.units, rows, cols, strict=True):
            full += unit.macs_per_cell * unit.axes[0].size_out * unit.axes[1].size_out
            if unit.kind == "block":
                area = math.ceil(rp.length / unit.axes[0].stride) * math.ceil(cp.length / unit.axes[1].stride)
            else:
                area = rp.size * cp.size
            computed += unit.macs_per_cell * area
        return total_macs - full + computed


def chunks(
    chain: Chain | None, rows: int, cols: int, batch_size: int
) -> Iterator[tuple[list[tuple[int, int]], list[AxisPlan] | None, list[AxisPlan] | None]]:
    """Copies in chunks of at most ``batch_size``; with a chain, one row band x one column
    band each, bands grouping positions whose changed regions are about the same size."""
    if chain is None:
        positions = [(i, j) for i in range(rows) for j in range(cols)]
        for offset in range(0, len(positions), batch_size):
            yield positions[offset : offset + batch_size], None, None
        return
    band = max(1, math.isqrt(batch_size))
    row_bands = bands(*chain.spatial_extents(0), rows, band)
    col_bands = bands(*chain.spatial_extents(1), cols, max(1, batch_size // band))
    col_plans = [chain.plan(1, members) for members in col_bands]
    for row_members in row_bands:
        row_plan = chain.plan(0, row_members)
        for col_members, col_plan in zip(col_bands, col_plans, strict=True):
            yield [(i, j) for i in row_members for j in col_members], row_plan, col_plan


def choose_chain(
    module: torch.nn.Module,
    recording: Recording,
    image: torch.Tensor,
    units: list[Unit],
    patch_rows: list[int],
    patch_cols: list[int],
    window: int,
    layer_module: torch.nn.Module | None,
    layer_is_nchw: bool = True,
) -> tuple[Chain | None, str]:
    """Cut the chain where recomputing patches stops paying, check it on the clean image,
    and return it (or ``None``: plain batched recomputation) with a note.

    Args:
        layer_is_nchw: the watched layer's output is an ``(N, C, H, W)`` map; otherwise (NHWC,
            tokens) the chain stops before the unit that computes it, and a hook reads it.

    Returns:
        ``(chain, note)``: ``note`` is ``""`` unless the incremental plan did not fit the model
        (a unit whose replay does not reproduce the clean pass: squeeze-excite, a skip
        connection or control flow reading a chain tensor elsewhere), in which case it says
        where and why the chain stopped, or that every copy runs whole.
    """
    if not units:
        return None, ""
    layer_key = None
    if layer_module is not None:
        call = recording.outputs.get(id(layer_module))
        if call is not None:
            layer_key = (id(call.output), call.output_version)
        for index, unit in enumerate(units):
            # A layer inside a block is computed in the swapped-out part: stop before it. So is
            # a layer that is not NCHW: its totals come from a hook after the chain.
            inside = any(sub is layer_module for sub in unit.module.modules())
            if inside and (unit.output_key != layer_key or not layer_is_nchw):
                units = units[:index]
                break
        if not units:
            return None, ""
    row_extents = true_extents(units, 0, patch_rows, window)
    col_extents = true_extents(units, 1, patch_cols, window)
    end = -1
    for index, unit in enumerate(units):
        # A pool (no multiply-adds) costs about the same either way, and computing it here
        # shrinks what is pasted into whole maps afterwards: only units with work can cut.
        if unit.kind in ("window", "block") and unit.macs_per_cell > 0:
            rows, cols = row_extents[index].size, col_extents[index].size
            fraction = (sum(rows) / len(rows)) * (sum(cols) / len(cols)) / (unit.axes[0].size_out * unit.axes[1].size_out)
            if fraction > FULL_RECOMPUTE_FRACTION:
                break
        end = index
    if end < 0:
        return None, ""
    units = units[: end + 1]
    chain = Chain(units, None, row_extents[: end + 1], col_extents[: end + 1], patch_rows, patch_cols, window, None)  # type: ignore[arg-type]
    rows_all, cols_all = chain.plan(0, range(len(patch_rows))), chain.plan(1, range(len(patch_cols)))
    clean, trusted = run_clean(units, image)
    problems = [f"{units[trusted].path} does not compute exactly on a padded crop"] if trusted < len(units) else []
    for index, unit in enumerate(units[:trusted]):
        if unit.kind == "block" and not _block_fits(unit, clean, index, rows_all[index], cols_all[index]):
            trusted = index
            problems = [f"{unit.path} does not compute exactly on a crop"]
            break
    # Check the swap itself: replaying the clean activation must give the clean logits even
    # when the model is fed noise. A chain tensor read elsewhere (a skip connection, the
    # input of a squeeze-excite product) or the input read outside the chain shows up here,
    # as different logits or as a forward that fails on the replayed tensor. The whole chain
    # first; when it fails, the longest prefix that passes, by bisection (at most
    # SWAP_CHECKS more forwards).
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(0)).to(image)

    def problem_at(last: int) -> str:
        return _swap_problem(module, units[: last + 1], clean.outputs[last], noise, recording.logits)

    end = trusted - 1
    problem = problem_at(end) if end >= 0 else ""
    if problem:
        problems.append(f"replaying the layers up to {units[end].path} {problem}")
        # Only prefixes that would still save MIN_SAVING_AFTER_MISFIT of a copy are worth a check.
        saving = _savings(units[:end], rows_all, cols_all)
        total = sum(recording.macs.values())
        worth = [k for k, saved in enumerate(saving) if saved >= MIN_SAVING_AFTER_MISFIT * total]
        good, bad = (worth[0] - 1, end) if worth and total > 0 else (-1, 0)  # known to pass / to fail
        for _ in range(SWAP_CHECKS):
            if bad - good <= 1:
                break
            middle = (good + bad) // 2
            if problem_at(middle):
                bad = middle
            else:
                good = middle
        end = good if good >= 0 and worth and good >= worth[0] else -1
    why = "; ".join(problems)
    whole = f"incremental occlusion does not fit this model ({why}): every copy ran the whole network"
    if end < 0:
        return None, whole if why else ""
    watch = None
    if layer_key is not None and layer_is_nchw:
        watch = next((i for i, u in enumerate(units[: end + 1]) if u.output_key == layer_key), None)
    chain = Chain(
        units[: end + 1],
        CleanPass(clean.inputs[: end + 1], clean.canvases[: end + 1], clean.outputs[: end + 1]),
        row_extents[: end + 1],
        col_extents[: end + 1],
        patch_rows,
        patch_cols,
        window,
        watch,
    )
    if not why:
        return chain, ""
    # Cut short by a misfit: keep what is left only when it still saves real work.
    total = sum(recording.macs.values())
    largest = chain.macs_per_copy(chain.plan(0, range(len(patch_rows))), chain.plan(1, range(len(patch_cols))), total)
    if total <= 0 or largest > (1 - MIN_SAVING_AFTER_MISFIT) * total:
        return None, whole
    return chain, f"incremental chain stops at {units[end].path} ({why})"


def _swap_problem(
    module: torch.nn.Module, units: Sequence[Unit], value: torch.Tensor, noise: torch.Tensor, logits: torch.Tensor
) -> str:
    """``""`` when the model fed ``noise``, with ``units`` swapped for a replay of ``value``,
    gives the clean ``logits``; else what went wrong, as a clause."""
    try:
        with replayed(module, units) as replay:
            replay.value = value.clone()
            got = module(noise)
    except Exception as exc:  # noqa: BLE001 - the rest of the network does not take the replayed tensor
        return f"breaks the forward ({_first_line(exc)})"
    if not isinstance(got, torch.Tensor) or not close(got, logits):
        return "does not reproduce the clean scores (a tensor of the chain is also read elsewhere)"
    return ""


def _savings(units: Sequence[Unit], rows: Sequence[AxisPlan], cols: Sequence[AxisPlan]) -> list[float]:
    """Per prefix ``units[: k + 1]``: multiply-adds a copy saves at most (patches as large as the
    largest position's) against computing those units on whole maps."""
    out, saved = [], 0.0
    for unit, rp, cp in zip(units, rows, cols, strict=False):
        area = unit.axes[0].size_out * unit.axes[1].size_out
        if unit.kind == "block":
            computed = math.ceil(rp.length / unit.axes[0].stride) * math.ceil(cp.length / unit.axes[1].stride)
        else:
            computed = rp.size * cp.size
        saved += unit.macs_per_cell * (area - computed)
        out.append(saved)
    return out


def _block_fits(unit: Unit, clean: CleanPass, index: int, rows: AxisPlan, cols: AxisPlan) -> bool:
    """``check_block``, where a block that fails on a crop (a size it refuses) does not fit."""
    try:
        return check_block(unit, clean, index, rows, cols)
    except Exception:  # noqa: BLE001 - a crop size the block refuses
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
