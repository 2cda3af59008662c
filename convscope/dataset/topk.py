"""The running top-k table of the dataset miner: per channel, the best activations seen so far.

Pure tensor code, merged batch by batch by (value descending, image position ascending), so the result
does not depend on how the dataset was split into batches or ranks. This is the miner's numeric core
(``make mutate`` runs it as ``patches_merge``). The miner works in two halves: ``candidates`` in the
forward hook (what of a batch can enter a table) and ``merge_candidates`` after the pass (all layers
in one sort); ``TopkTable.update`` is the plain definition both are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

EMPTY = torch.iinfo(torch.int64).max  # image position of an unfilled slot: sorts after every real one


def merge_topk(
    values: torch.Tensor, images: torch.Tensor, cells: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's ``top`` best candidates: higher value first, then lower image position.

    Args:
        values: ``(C, M)`` float candidates (``-inf`` for empty slots).
        images: ``(C, M)`` int64 image positions (``EMPTY`` for empty slots).
        cells: ``(C, M)`` int64 flat cell of each candidate.

    Returns:
        ``(C, top)`` values, images and cells, padded with empty slots when ``M < top``.
    """
    if values.shape[1] < top:
        pad = top - values.shape[1]
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        images = torch.cat([images, images.new_full((images.shape[0], pad), EMPTY)], 1)
        cells = torch.cat([cells, cells.new_zeros((cells.shape[0], pad))], 1)
    # Two stable sorts make a lexicographic one: by position, then by value (descending).
    order = images.argsort(dim=1, stable=True)
    values, images, cells = values.gather(1, order), images.gather(1, order), cells.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :top]
    return values.gather(1, order), images.gather(1, order), cells.gather(1, order)


@dataclass(frozen=True)
class TopkTable:
    """One layer's running top-k: ``(C, top)`` values, image positions and flat cells."""

    values: torch.Tensor
    images: torch.Tensor
    cells: torch.Tensor

    @staticmethod
    def empty(channels: int, top: int, device: torch.device) -> TopkTable:
        return TopkTable(
            torch.full((channels, top), float("-inf"), device=device),
            torch.full((channels, top), EMPTY, dtype=torch.int64, device=device),
            torch.zeros((channels, top), dtype=torch.int64, device=device),
        )

    def update(self, peaks: torch.Tensor, where: torch.Tensor, positions: torch.Tensor) -> TopkTable:
        """Merge a batch: ``peaks``/``where`` ``(B, C)``, ``positions`` ``(B,)``.

        The plain merge, and the definition the miner's ``update_from_maps`` is tested against;
        the miner itself uses ``update_from_maps``, which gives the same table with less work.
        """
        count = self.values.shape[0]
        batch_images = positions.to(self.images.device).unsqueeze(0).expand(count, -1)
        values, images, cells = merge_topk(
            torch.cat([self.values, peaks.t().float()], 1),
            torch.cat([self.images, batch_images], 1),
            torch.cat([self.cells, where.t()], 1),
            self.values.shape[1],
        )
        return TopkTable(values, images, cells)

    def update_from_maps(self, output: torch.Tensor, chosen: torch.Tensor | None, positions: torch.Tensor) -> TopkTable:
        """Merge a batch of maps ``(B, C_all, h, w)``; the same table as ``update(*peaks(output, chosen), positions)``.

        Cheaper: ``candidates`` then ``merge_candidates``, the miner's two halves for one layer.
        """
        return merge_candidates([self], [candidates(output, chosen, self.values[:, -1])], positions)[0]

    def cpu(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.cpu(), "images": self.images.cpu(), "cells": self.cells.cpu()}


@dataclass(frozen=True)
class Candidates:
    """A batch's entries that may enter one layer's table, ``(K,)`` each, ordered by (row, image).

    Attributes:
        rows: the table row (listed channel) of each entry.
        images: the entry's image as its row in the batch.
        values: the channel's maximum over that image's map (NaN counted as ``-inf``).
        cells: the flat cell of that maximum (the first of equal maxima, row-major).
    """

    rows: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    cells: torch.Tensor


def candidates(output: torch.Tensor, chosen: torch.Tensor | None, threshold: torch.Tensor) -> Candidates:
    """The entries of a batch of maps ``(B, C_all, h, w)`` worth merging into a table whose rows'
    ``top``-th values are ``threshold`` ``(C,)``.

    An entry below its row's threshold can never enter (the table already holds ``top`` better
    ones); an equal one may (a lower image position wins the tie), so ``>=`` keeps it. The maxima
    come from ``amax`` (no indices); the cell is searched only in the maps of the kept entries,
    which after the first batches are a few per batch. Runs in the forward hook, while ``output``
    is still the module's own output: only ``(K,)`` tensors outlive the call.
    """
    values = output.amax(dim=(2, 3))  # (B, C_all); NaN propagates like max
    if chosen is not None:
        values = values.index_select(1, chosen)
    values = torch.nan_to_num(values.float(), nan=float("-inf")).t()  # (C, B)
    # nonzero of a row-major (C, B) mask lists entries by row, then by image: the order
    # ``merge_candidates`` lays them out in.
    rows, images = (values >= threshold.unsqueeze(1)).nonzero(as_tuple=True)
    channels = rows if chosen is None else chosen[rows]
    # Index first, flatten after: for a map that is a view of another layout (NHWC) only the K
    # kept maps are copied, not the whole batch. argmax returns the first of equal maxima.
    cells = output[images, channels].flatten(1).argmax(dim=1)
    return Candidates(rows, images, values[rows, images], cells)


def merge_candidates(
    tables: Sequence[TopkTable], found: Sequence[Candidates], positions: torch.Tensor
) -> list[TopkTable]:
    """Merge each layer's ``candidates`` of one batch (``positions`` ``(B,)``) into its table.

    The rows that received candidates, of every layer at once, go through one ``merge_topk``:
    each such row holds its table entries followed by its candidates, padded to the widest row's
    candidate count with empty slots (which sort after every real entry, as the table's own do).
    Rows without candidates are left as they are. The result equals ``TopkTable.update`` with
    every image of the batch, since the left-out entries could not have entered.
    """
    parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    width = 0
    for layer, (table, found_here) in enumerate(zip(tables, found, strict=True)):
        if found_here.rows.numel() == 0:
            continue
        counts = torch.bincount(found_here.rows, minlength=table.values.shape[0])
        rows = counts.nonzero().squeeze(1)
        # Each entry's place: its row among the rows merged, its slot among that row's candidates.
        compact = (torch.cumsum(counts > 0, 0) - 1)[found_here.rows]
        slot = torch.arange(found_here.rows.numel(), device=counts.device) - (torch.cumsum(counts, 0) - counts)[found_here.rows]
        width = max(width, int(counts.max()))
        parts.append((layer, rows, compact, slot, counts))
    if not parts:
        return list(tables)
    values, images, cells = [], [], []
    for layer, rows, compact, slot, _ in parts:
        table, found_here = tables[layer], found[layer]
        shape = (rows.numel(), width)
        batch_values = table.values.new_full(shape, float("-inf"))
        batch_images = table.images.new_full(shape, EMPTY)
        batch_cells = table.cells.new_zeros(shape)
        batch_values[compact, slot] = found_here.values
        batch_images[compact, slot] = positions.to(table.images.device)[found_here.images]
        batch_cells[compact, slot] = found_here.cells
        values.append(torch.cat([table.values[rows], batch_values], 1))
        images.append(torch.cat([table.images[rows], batch_images], 1))
        cells.append(torch.cat([table.cells[rows], batch_cells], 1))
    top = tables[0].values.shape[1]
    merged = merge_topk(torch.cat(values), torch.cat(images), torch.cat(cells), top)
    out = list(tables)
    start = 0
    for layer, rows, *_ in parts:
        table = tables[layer]
        stop = start + rows.numel()
        table_values, table_images, table_cells = table.values.clone(), table.images.clone(), table.cells.clone()
        table_values[rows], table_images[rows], table_cells[rows] = (part[start:stop] for part in merged)
        out[layer] = TopkTable(table_values, table_images, table_cells)
        start = stop
    return out


def peaks(output: torch.Tensor, chosen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, h, w)`` -> per image and channel the maximum and its flat cell, ``(B, C)`` each."""
    if chosen is not None:
        output = output.index_select(1, chosen)
    # max over a dim returns the first index among equal maxima (documented), i.e. row-major.
    values, where = output.flatten(2).max(dim=2)
    return torch.nan_to_num(values.float(), nan=float("-inf")), where


def relevance_peaks(relevance: torch.Tensor, chosen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, h, w)`` relevance -> per image and channel its sum over the map and the flat cell of
    its largest value, ``(B, C)`` each (CRP's channel relevance and its reference cell).

    The sum ranks the image; the cell (the first of equal maxima, row-major) places its box. A
    NaN sum counts as ``-inf``, as a NaN activation does in ``peaks``.
    """
    if chosen is not None:
        relevance = relevance.index_select(1, chosen)
    flat = relevance.flatten(2)
    values = flat.sum(dim=2, dtype=torch.float32)
    return torch.nan_to_num(values, nan=float("-inf")), flat.argmax(dim=2)
