"""Feature evolution during training (Zeiler & Fergus Fig. 4).

At chosen epochs, record the first layer's filters and, for a fixed set of channels in every conv
stage, the deconvnet projection of the channel's strongest activation over a fixed set of probe
images. Each snapshot is stored as ``snapshots/epoch_NNN.pt`` (tensors) and ``epoch_NNN.png``; at
the end ``evolution.png`` puts the epochs side by side, one row per channel, and
``filters_evolution.png`` does the same for the first-layer filters.

The probes and channels are chosen once, from a seed, so rows are comparable across epochs and
across a resumed run.

This module records and reads snapshots; a run writes them and their pictures into its folder
(``convscope.training.rundir``), and ``convscope.render.training`` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convscope.probes.hooks import capture, eval_mode
from convscope.probes.layers import map_layer, resolve_layer
from convscope.types import LoadedModel

SNAPSHOT_FOLDER = "snapshots"


@dataclass(frozen=True)
class Snapshot:
    """The network's features at one epoch.

    Attributes:
        epoch: 0 is the initialisation.
        filters: ``(out, in, kh, kw)`` first-layer kernels, each min-max scaled to ``[0, 1]``.
        strongest_input: ``(out,)`` int64, each filter's input channel of largest norm.
        layers: stage aliases, in forward order.
        channels: per layer, ``(K,)`` int64 channels followed.
        probes: per layer, ``(K,)`` int64 index (into the probe set) of the image that excites
            each channel most at this epoch.
        projections: per layer, ``(K, C, H, W)`` float32 deconvnet projections of that strongest
            activation.
        values: per layer, ``(K,)`` float32 the activation projected.
        boxes: per layer, ``(K, 4)`` int64 ``(top, left, bottom, right)`` input pixels the projected
            activation sees (its receptive field), for cropping as in the paper's figures.
    """

    epoch: int
    filters: torch.Tensor
    strongest_input: torch.Tensor
    layers: tuple[str, ...]
    channels: dict[str, torch.Tensor]
    probes: dict[str, torch.Tensor]
    projections: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    boxes: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "filters": self.filters,
            "strongest_input": self.strongest_input,
            "layers": list(self.layers),
            "channels": dict(self.channels),
            "probes": dict(self.probes),
            "projections": dict(self.projections),
            "values": dict(self.values),
            "boxes": dict(self.boxes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            epoch=int(data["epoch"]),
            filters=data["filters"],
            strongest_input=data["strongest_input"],
            layers=tuple(data["layers"]),
            channels=dict(data["channels"]),
            probes=dict(data["probes"]),
            projections=dict(data["projections"]),
            values=dict(data["values"]),
            boxes=dict(data["boxes"]),
        )


def live_stages(loaded: LoadedModel) -> list[str]:
    """Stage aliases whose module still exists (ablation may have replaced some by ``Identity``)."""
    names = []
    for alias in loaded.stages:
        _, module = resolve_layer(loaded, alias)
        if not isinstance(module, nn.Identity):
            names.append(alias)
    return names


class FeatureEvolution:
    """Records snapshots of one model during training.

    Args:
        loaded: the model being trained (its module is read, never changed).
        probes: ``(P, C, H, W)`` normalised probe images (fixed for the whole run).
        channels_per_layer: channels followed in each conv stage.
        seed: chooses the channels.
    """

    def __init__(
        self, loaded: LoadedModel, probes: torch.Tensor, *, channels_per_layer: int = 4, seed: int = 0
    ) -> None:
        self.loaded = loaded
        self.probes = probes
        self.layers = tuple(live_stages(loaded))
        widths = self._channel_counts()
        generator = torch.Generator().manual_seed(seed)
        self.channels = {
            name: torch.randperm(widths[name], generator=generator)[: min(channels_per_layer, widths[name])]
            .sort()
            .values
            for name in self.layers
        }

    def _peaks(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer, ``(P, C)`` the largest activation of each channel in each probe."""
        found = {name: map_layer(self.loaded, name, batch.shape[1:]) for name in self.layers}
        modules = {name: layer.module for name, layer in found.items()}
        layouts = {name: layer.layout for name, layer in found.items()}
        module = self.loaded.module
        with eval_mode(module), torch.no_grad(), capture(module, modules, layouts=layouts) as store:
            module(batch.to(self.loaded.device))
        return {name: store.last(name).flatten(2).amax(dim=2).float().cpu() for name in self.layers}

    def _channel_counts(self) -> dict[str, int]:
        return {name: peaks.shape[1] for name, peaks in self._peaks(self.probes[:1]).items()}

    def record(self, epoch: int) -> Snapshot:
        """Filters and projections of the model as it is now."""
        from convscope.methods.deconvnet import deconv
        from convscope.methods.filters import conv_filters

        filters = conv_filters(self.loaded)
        peaks = self._peaks(self.probes)
        chosen_probes: dict[str, torch.Tensor] = {}
        projections: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        boxes: dict[str, torch.Tensor] = {}
        for name in self.layers:
            channels = self.channels[name]
            best = peaks[name][:, channels].argmax(dim=0)  # (K,) probe per channel
            unique, slot = torch.unique(best, return_inverse=True)
            result = deconv(self.loaded, self.probes[unique], name, channel=channels.tolist(), location="max")
            k = torch.arange(len(channels))
            projections[name] = result.projections[slot, k]
            values[name] = result.values[slot, k]
            boxes[name] = result.boxes[slot, k]
            chosen_probes[name] = best
        return Snapshot(
            epoch=epoch,
            filters=filters.normalized,
            strongest_input=filters.strongest_input,
            layers=self.layers,
            channels={n: c.clone() for n, c in self.channels.items()},
            probes=chosen_probes,
            projections=projections,
            values=values,
            boxes=boxes,
        )


def snapshot_path(run_dir: str | Path, epoch: int, suffix: str = ".pt") -> Path:
    return Path(run_dir) / SNAPSHOT_FOLDER / f"epoch_{epoch:03d}{suffix}"


def load_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """Every stored snapshot of a run, by epoch."""
    folder = Path(run_dir) / SNAPSHOT_FOLDER
    found = []
    for path in sorted(folder.glob("epoch_*.pt")):
        found.append(Snapshot.from_dict(torch.load(path, map_location="cpu", weights_only=True)))
    return sorted(found, key=lambda s: s.epoch)
