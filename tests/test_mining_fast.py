"""The fast mining pass (issue 22): candidates filtered in the hook and merged for all layers at
once, the pass stopped after the last mined layer, and winners decoded once for the crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convscope
from convscope.dataset import patches as patches_module
from convscope.dataset.patches import collect_patches, top_patches
from convscope.dataset.sources import TensorSource
from convscope.dataset.topk import TopkTable, candidates, merge_candidates, peaks
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess


def test_fused_merge_of_several_layers_equals_the_full_merge() -> None:
    """Three layers of different widths merged in one ``merge_candidates`` per batch keep exactly
    the tables of the plain per-layer merge: ties between images and inside maps, NaN maps,
    shuffled positions, and batches where only a few entries pass the threshold."""
    generator = torch.Generator().manual_seed(4)
    shapes = [(5, 3, 4), (8, 2, 2), (3, 5, 1)]  # (channels, h, w)
    chosen = [None, torch.tensor([6, 1, 3]), None]
    full = [TopkTable.empty(3 if c is not None else s[0], 4, torch.device("cpu")) for s, c in zip(shapes, chosen)]
    fused = list(full)
    order = torch.randperm(90, generator=generator)
    position = 0
    kept_late = offered_late = 0
    for step in range(15):
        batch = 1 + step % 6
        positions = order[position : position + batch]
        position += batch
        maps = [torch.randint(-3, 4, (batch, *shape), generator=generator).float() for shape in shapes]
        maps[0][0, 1] = 1.0  # a flat map: every cell ties
        if step in (0, 5):
            maps[1][:, 1] = float("nan")  # NaN counts as -inf
        found = [candidates(m, c, table.values[:, -1]) for m, c, table in zip(maps, chosen, fused)]
        if step >= 8:
            kept_late += sum(f.rows.numel() for f in found)
            offered_late += sum(batch * table.values.shape[0] for table in fused)
        fused = merge_candidates(fused, found, positions)
        full = [table.update(*peaks(m, c), positions) for table, m, c in zip(full, maps, chosen)]
        for a, b in zip(fused, full):
            torch.testing.assert_close(a.values, b.values)
            assert torch.equal(a.images, b.images), step
            assert torch.equal(a.cells, b.cells), step
    # Not vacuous: late batches were filtered (entries below a full row's threshold), but not to nothing.
    assert 0 < kept_late < offered_late, (kept_late, offered_late)


def test_candidates_are_the_entries_at_or_above_the_threshold() -> None:
    maps = torch.zeros(3, 2, 2, 2)
    maps[0, 0, 1, 0] = 5.0  # image 0, channel 0: max 5 at cell 2
    maps[1, 0, 0, 1] = 2.0  # image 1, channel 0: max 2 (ties the threshold) at cell 1
    maps[2, 1] = 7.0  # image 2, channel 1: flat, max 7 at the first cell
    found = candidates(maps, None, torch.tensor([2.0, 7.0]))
    assert found.rows.tolist() == [0, 0, 1]  # by row, then by image
    assert found.images.tolist() == [0, 1, 2]
    assert found.values.tolist() == [5.0, 2.0, 7.0]
    assert found.cells.tolist() == [2, 1, 0]


class Tail(nn.Module):
    """Counts its calls: the part of the network after the mined layers. Counted on the class, so
    the calls of a copy of the network (the miner runs fold's inference copy) count too."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return self.linear(x.flatten(1))


class Net(nn.Module):
    def __init__(self, shared_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.relu2 = self.relu1 if shared_relu else nn.ReLU()
        self.tail = Tail()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


def _wrapped(net: nn.Module):
    return wrap_model(net, preprocess=Preprocess(resize=None, crop=8, mean=(0.0,), std=(1.0,), channels=1), name="net")


def _brute(net: nn.Module, images: torch.Tensor, path: str, top: int) -> list[list[tuple[int, float]]]:
    """Every image's per-channel maximum of the module's last call, sorted by (-value, index)."""
    module = dict(net.named_modules())[path]
    with torch.no_grad(), convscope.capture(net, {path: module}) as cap:
        net(images)
    acts = cap.last(path).flatten(2).amax(2)  # (N, C)
    return [sorted(((i, float(acts[i, c])) for i in range(len(images))), key=lambda t: (-t[1], t[0]))[:top]
            for c in range(acts.shape[1])]


@pytest.mark.parametrize("layers", [["conv1"], ["relu1", "conv2"]])
def test_the_pass_stops_after_the_last_mined_layer(layers, assert_no_side_effects) -> None:
    torch.manual_seed(0)
    net = Net().eval()
    images = torch.randn(12, 1, 8, 8)
    loaded = _wrapped(net)
    top_patches(loaded, images[:2], layers, top=3)  # the one-off set-up (the inference copy's trace) done
    calls = []
    for batch_size in (1, 6):
        Tail.calls = 0
        index = assert_no_side_effects(
            net, lambda size=batch_size: top_patches(loaded, images, layers, top=3, batch_size=size))
        calls.append(Tail.calls)
        for name in layers:
            got = [[(e.index, e.value) for e in entries] for entries in index.layers[name]]
            assert got == _brute(net, images, name, 3), name
    # Only the set-up probes reach the tail: 12 batches cost it as many calls as 2.
    assert calls[0] == calls[1] < 12, calls


def test_a_module_run_twice_is_mined_at_its_last_call_and_the_pass_runs_through() -> None:
    torch.manual_seed(1)
    net = Net(shared_relu=True).eval()
    images = torch.randn(10, 1, 8, 8)
    Tail.calls = 0
    index = top_patches(_wrapped(net), images, ["relu1"], top=3, batch_size=5)
    assert Tail.calls >= 2  # the two batches ran to the end: no safe place to stop
    got = [[(e.index, e.value) for e in entries] for entries in index.layers["relu1"]]
    assert got == _brute(net, images, "relu1", 3)  # the second call's maps (after conv2)
    assert index.layers["relu1"][0][0].cell[0] < 4  # a 4x4 map: the second call's


class CountingSource(TensorSource):
    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(images)
        self.rows_loaded = 0

    def load(self, indices):  # type: ignore[no-untyped-def]
        self.rows_loaded += len(indices)
        return super().load(indices)


def test_winners_are_decoded_once_while_needed_and_give_the_same_crops(monkeypatch) -> None:
    torch.manual_seed(2)
    net = Net().eval()
    images = torch.randn(6, 1, 8, 8)
    loaded = _wrapped(net)
    index = top_patches(loaded, images, ["conv1", "conv2"], top=4, batch_size=3)
    entries = [e for name in ("conv1", "conv2") for lists in index.layers[name] for e in lists]
    assert len(entries) == 32 and len({e.index for e in entries}) <= 6  # each image wins many times

    def crops(source: CountingSource, batch_size: int):  # type: ignore[no-untyped-def]
        out = [(p.layer, p.channel, [c.clone() for c in p.crops], [q.clone() for q in p.projections or ()])
               for p in collect_patches(loaded, source, index, projections=True, batch_size=batch_size)]
        return out, source.rows_loaded

    cached, rows_cached = crops(CountingSource(images), 5)
    monkeypatch.setattr(patches_module, "RELOAD_CACHE_BYTES", 0)  # no room: every entry loads again
    uncached, rows_uncached = crops(CountingSource(images), 5)
    # Without room an image is still loaded once per chunk of 5 entries, not once per entry.
    per_chunk = sum(len({e.index for e in layer_entries[i : i + 5]})
                    for layer_entries in ([e for lists in index.layers[n] for e in lists] for n in ("conv1", "conv2"))
                    for i in range(0, 16, 5))
    assert rows_cached == len({e.index for e in entries}) < per_chunk == rows_uncached < 32
    assert len(cached) == len(uncached) == 8
    for (layer, channel, a, pa), (layer2, channel2, b, pb) in zip(cached, uncached):
        assert (layer, channel) == (layer2, channel2)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    # And the crops are the pictures under the boxes (conv2 channel 1 is the 6th channel yielded).
    first = index.layers["conv2"][1][0]
    x0, y0, x1, y1 = first.box
    assert torch.equal(cached[5][2][0], images[first.index, :, y0:y1, x0:x1].clamp(0, 1))  # mean 0, std 1


@pytest.mark.parametrize("channels", [3, 1])
def test_file_batches_equal_to_tensor_bit_for_bit(tmp_path: Path, channels: int) -> None:
    from PIL import Image

    from convscope.dataset.sources import FileSource
    from convscope.imageio import load_image
    from convscope.preprocess import Preprocess

    rng = np.random.default_rng(0)
    paths = []
    for k, size in enumerate([(40, 30), (33, 57), (64, 64)]):
        path = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    paths.insert(1, tmp_path / "broken.png")
    preprocess = Preprocess(resize=36, crop=32, mean=(0.5,) * channels, std=(0.25,) * channels, channels=channels)
    source = FileSource(paths, preprocess)
    (batch,) = list(source.batches(range(len(paths)), 8))
    assert batch.indices.tolist() == [0, 2, 3] and [i for i, _ in batch.failed] == [1]
    expected = preprocess.to_tensor([load_image(paths[i]) for i in (0, 2, 3)])
    assert batch.images.dtype == torch.float32 and torch.equal(batch.images, expected)
