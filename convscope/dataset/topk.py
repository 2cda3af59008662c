"""The running top-k table of the dataset miner: per channel, the best activations seen so far.

Pure tensor code, merged batch by batch by (value descending, image position ascending), so the result
does not depend on how the dataset was split into batches or ranks. This is the miner's numeric core
(``make mutate`` runs it as ``patches_merge``).
"""

from __future__ import annotations

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

        Cheaper: the maxima come from ``amax`` (no indices); only channels where some image
        reaches the current ``top``-th value (``>=``, so ties are merged and ordered by
        ``merge_topk``) are merged; and the cell of a maximum is found only for the images that
        entered the table. Once the table holds strong maps, few channels merge per batch.
        """
        values = output.amax(dim=(2, 3))  # (B, C_all); NaN propagates like max
        if chosen is not None:
            values = values.index_select(1, chosen)
        values = torch.nan_to_num(values.float(), nan=float("-inf")).t()  # (C, B)
        rows = (values >= self.values[:, -1:]).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return self
        batch = values.shape[1]
        # Batch candidates carry -1 - (their row in the batch) as the cell until they win a place.
        slots = -1 - torch.arange(batch, device=values.device, dtype=torch.int64)
        merged_values, merged_images, merged_cells = merge_topk(
            torch.cat([self.values[rows], values[rows]], 1),
            torch.cat([self.images[rows], positions.to(self.images.device).unsqueeze(0).expand(len(rows), -1)], 1),
            torch.cat([self.cells[rows], slots.unsqueeze(0).expand(len(rows), -1)], 1),
            self.values.shape[1],
        )
        new = (merged_cells < 0).nonzero()  # (K, 2): row in ``rows``, slot in the table
        if len(new):
            which = rows[new[:, 0]]
            channel = which if chosen is None else chosen[which]
            image = -1 - merged_cells[new[:, 0], new[:, 1]]
            # argmax returns the first of equal maxima (row-major), as ``peaks``' max does.
            merged_cells[new[:, 0], new[:, 1]] = output.flatten(2)[image, channel].argmax(dim=1)
        table_values, table_images, table_cells = self.values.clone(), self.images.clone(), self.cells.clone()
        table_values[rows], table_images[rows], table_cells[rows] = merged_values, merged_images, merged_cells
        return TopkTable(table_values, table_images, table_cells)

    def cpu(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.cpu(), "images": self.images.cpu(), "cells": self.cells.cpu()}


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
