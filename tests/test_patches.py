"""Dataset patches (issue 9): the streaming miner against brute force, receptive-field boxes,
projections, rendering, channel parsing and sharding arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import convscope
from convscope.dataset.patches import collect_patches, top_patches
from convscope.dataset.topk import EMPTY, merge_topk
from convscope.distributed import shard_range
from convscope.errors import BadArgument, DataError, UnknownLayer
from convscope.models.load import load_model, wrap_model
from convscope.preprocess import Preprocess
from convscope.probes.geometry import cell_box, layer_geometry

LAYERS = ["conv1", "conv3", "conv5"]


@pytest.fixture(scope="module")
def zfnet():
    return load_model("zfnet_mnist", "random", seed=3)


@pytest.fixture(scope="module")
def images_with_ties() -> torch.Tensor:
    """23 normalised 28x28 images: random ones, exact duplicates (ties between images) and flat
    ones (every cell of a map equal: ties inside a map)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(23, 1, 28, 28, generator=generator)
    images[5] = images[2]
    images[17] = images[2]
    images[11] = images[9]
    images[8] = 0.0
    images[20] = 0.0
    images[14] = -5.0
    return images


def brute_force(loaded, images: torch.Tensor, layers: list[str], top: int):
    """Every activation of every image stored, then sorted per channel by (-value, index)."""
    modules = dict(loaded.module.named_modules())
    stored = {}
    with torch.no_grad(), convscope.capture(loaded.module, {n: modules[loaded.stages[n]] for n in layers}) as cap:
        loaded.module.eval()
        loaded.module(images)
    for name in layers:
        stored[name] = cap.last(name)
    result = {}
    for name, acts in stored.items():
        count, channels, _, width = acts.shape
        per_channel = []
        for c in range(channels):
            candidates = []
            for i in range(count):
                plane = acts[i, c]
                value = plane.max()
                flat = torch.nonzero(plane.flatten() == value)[0, 0].item()  # first in row-major order
                candidates.append((-value.item(), i, (flat // width, flat % width)))
            candidates.sort(key=lambda t: (t[0], t[1]))
            per_channel.append([(i, -v, cell) for v, i, cell in candidates[:top]])
        result[name] = per_channel
    return result


def assert_same_lists(lists, expected, name: str) -> None:
    """The same images and cells in the same order; values equal to float32 rounding (the miner
    runs the BatchNorm-folded copy of the network, the brute force the network itself)."""
    got = [[(e.index, e.cell) for e in entries] for entries in lists]
    assert got == [[(i, cell) for i, _, cell in entries] for entries in expected], name
    values = torch.tensor([[e.value for e in entries] for entries in lists])
    torch.testing.assert_close(values, torch.tensor([[v for _, v, _ in entries] for entries in expected]),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def expected(zfnet, images_with_ties):
    return brute_force(zfnet, images_with_ties, LAYERS, top=5)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 23])
def test_streaming_index_equals_brute_force(zfnet, images_with_ties, expected, batch_size) -> None:
    index = top_patches(zfnet, images_with_ties, LAYERS, top=5, batch_size=batch_size)
    assert index.images == 23 and index.skipped == ()
    for name in LAYERS:
        assert_same_lists(index.layers[name], expected[name], name)
        assert index.channels[name] == tuple(range(len(index.layers[name])))
    # The deliberate ties were exercised: a duplicate pair sits in some list, lower index first,
    # and the flat images (8, 20) report the first cell (0, 0).
    flat = [e for lists in index.layers["conv1"] for entries in [lists] for e in entries if e.index in (8, 20)]
    tied = [[e.index for e in entries] for entries in index.layers["conv1"]]
    assert any(2 in row and 5 in row and row.index(2) < row.index(5) for row in tied)
    assert all(e.cell == (0, 0) for e in flat)


def test_channel_subset_and_small_dataset(zfnet, images_with_ties) -> None:
    full = top_patches(zfnet, images_with_ties, "conv3", top=30, batch_size=8)
    # top larger than the dataset: every list holds every image once.
    assert all(sorted(e.index for e in entries) == list(range(23)) for entries in full.layers["conv3"])
    some = top_patches(zfnet, images_with_ties, ["conv3"], top=4, channels=[7, 2, 7], batch_size=5)
    assert some.channels["conv3"] == (2, 7) and some.chosen
    assert some.layers["conv3"] == (full.layers["conv3"][2][:4], full.layers["conv3"][7][:4])
    document = some.to_json()
    assert document["channels"] == {"conv3": [2, 7]}
    assert set(document) == {"model", "rank", "images", "skipped", "layers", "channels"}
    assert document["rank"] == "activation"
    assert set(document["layers"]["conv3"][0][0]) == {"image", "value", "cell", "box"}
    assert "channels" not in full.to_json()


def test_merge_topk_orders_by_value_then_image() -> None:
    values = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 2.0]])
    images = torch.tensor([[4, 9, 2, EMPTY, 1]])
    cells = torch.tensor([[0, 1, 2, 0, 4]])
    v, i, c = merge_topk(values, images, cells, 3)
    assert v.tolist() == [[3.0, 3.0, 2.0]] and i.tolist() == [[2, 9, 1]] and c.tolist() == [[2, 1, 4]]
    v, i, _ = merge_topk(values[:, :1], images[:, :1], cells[:, :1], 3)
    assert i.tolist() == [[4, EMPTY, EMPTY]]
    # fewer candidates than slots, in more rows than candidates: each row padded on its own
    v, i, c = merge_topk(torch.tensor([[1.0, 5.0], [7.0, 2.0], [0.5, 0.5]]), torch.tensor([[3, 8], [1, 2], [6, 4]]),
                         torch.tensor([[10, 11], [12, 13], [14, 15]]), 4)
    inf = float("-inf")
    assert v.tolist() == [[5.0, 1.0, inf, inf], [7.0, 2.0, inf, inf], [0.5, 0.5, inf, inf]]
    assert i.tolist() == [[8, 3, EMPTY, EMPTY], [1, 2, EMPTY, EMPTY], [4, 6, EMPTY, EMPTY]]  # a tie: lower image first
    assert c.tolist() == [[11, 10, 0, 0], [12, 13, 0, 0], [15, 14, 0, 0]]


def test_running_table_stays_on_its_device_with_integer_positions() -> None:
    # meta tensors stand in for a GPU: nothing may fall back to the CPU default device or to float.
    from convscope.dataset.topk import TopkTable

    table = TopkTable.empty(3, 4, torch.device("meta"))
    assert [t.device.type for t in (table.values, table.images, table.cells)] == ["meta"] * 3
    assert (table.values.dtype, table.images.dtype, table.cells.dtype) == (torch.float32, torch.int64, torch.int64)
    cpu = TopkTable.empty(2, 3, torch.device("cpu"))
    assert cpu.values.tolist() == [[float("-inf")] * 3] * 2 and cpu.images.tolist() == [[EMPTY] * 3] * 2
    assert cpu.cells.tolist() == [[0] * 3] * 2
    updated = table.update(torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, dtype=torch.int64, device="meta"),
                           torch.tensor([5, 6]))  # positions arrive on the CPU
    assert updated.images.device.type == "meta" and updated.cells.dtype == torch.int64


def test_model_left_as_found_and_errors(zfnet, images_with_ties, assert_no_side_effects) -> None:
    zfnet.module.train()
    try:
        assert_no_side_effects(zfnet.module, lambda: top_patches(zfnet, images_with_ties, ["conv2"], batch_size=9))
    finally:
        zfnet.module.eval()
    with pytest.raises(UnknownLayer, match="conv9"):
        top_patches(zfnet, images_with_ties, ["conv9"])
    with pytest.raises(UnknownLayer, match="not a"):
        top_patches(zfnet, images_with_ties, ["classifier.1"])
    with pytest.raises(BadArgument, match="layer conv1 has 32 channels"):
        top_patches(zfnet, images_with_ties, ["conv1"], channels=[40])
    with pytest.raises(BadArgument, match="--top 0"):
        top_patches(zfnet, images_with_ties, ["conv1"], top=0)
    with pytest.raises(DataError, match="empty dataset"):
        top_patches(zfnet, images_with_ties[:0], ["conv1"])


class SquareDetector(nn.Module):
    """conv(3->2): channel 0 sums the pixels, channel 1 their negation; ReLU; pool; conv(2->2)
    summing channel 0 again; ReLU. Channel 0 at both depths responds to bright regions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0] = 1.0
            self.conv1.weight[1] = -1.0
            self.conv1.bias.zero_()
            self.conv2.weight.zero_()
            self.conv2.weight[0, 0] = 1.0
            self.conv2.weight[1, 1] = 1.0
            self.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))


def test_top_box_contains_the_bright_square() -> None:
    squares = [(3, 20, 0.4), (22, 5, 0.9), (12, 12, 0.6), (25, 26, 0.7), (0, 0, 0.5)]  # (y, x, brightness)
    images = torch.zeros(len(squares), 3, 32, 32)
    for i, (y, x, level) in enumerate(squares):
        images[i, :, y : y + 5, x : x + 5] = level
    model = wrap_model(SquareDetector(), preprocess=Preprocess(None, 32, (0.0,) * 3, (1.0,) * 3), categories=["a", "b"])
    index = top_patches(model, images, ["relu1", "relu2"], top=5, batch_size=2)
    for layer in ("relu1", "relu2"):
        best = index.layers[layer][0]
        assert [e.index for e in best] == [1, 3, 2, 4, 0]  # by brightness
        for entry in best:
            y, x, _ = squares[entry.index]
            x0, y0, x1, y1 = entry.box
            # the square's centre pixel is under the box of its strongest cell
            assert x0 <= x + 2 < x1 and y0 <= y + 2 < y1, (layer, entry)
            overlap = max(0, min(x1, x + 5) - max(x0, x)) * max(0, min(y1, y + 5) - max(y0, y))
            # relu1 sees 3x3 pixels, all on the square; relu2 sees 8x8, most of the square
            assert overlap >= (9 if layer == "relu1" else 16), (layer, entry)


def test_boxes_agree_with_summary_receptive_fields(zfnet, images_with_ties) -> None:
    table = {row.name: row for row in convscope.summary(zfnet).layers}
    index = top_patches(zfnet, images_with_ties, LAYERS, top=3, batch_size=8)
    for name in LAYERS:
        row = table[zfnet.stages[name]]
        geometry = layer_geometry(zfnet.module, images_with_ties[:1], zfnet.stages[name])
        assert round(geometry.size) == row.receptive_field and geometry.jump == row.jump and geometry.start == row.start
        for entries in index.layers[name]:
            for entry in entries:
                y, x = entry.cell
                top_, left, bottom, right = cell_box(geometry, y, x, (28, 28))
                assert entry.box == (left, top_, right, bottom)
                # unclipped boxes are exactly one receptive field wide, centred on start + cell * jump
                centre_x = row.start + x * row.jump
                if 0 < centre_x - row.receptive_field / 2 and centre_x + row.receptive_field / 2 < 28:
                    assert right - left == row.receptive_field
                    assert left == int(centre_x - row.receptive_field / 2)


def test_projections_match_deconv_and_crops_match_boxes(zfnet, images_with_ties) -> None:
    index = top_patches(zfnet, images_with_ties, ["conv2"], top=3, channels=[0, 5, 9], batch_size=8)
    got = list(collect_patches(zfnet, images_with_ties, index, batch_size=4))
    assert [(p.layer, p.channel) for p in got] == [("conv2", 0), ("conv2", 5), ("conv2", 9)]
    for patches in got:
        assert patches.projections is not None and len(patches.crops) == len(patches.entries) == 3
        for entry, crop, projection in zip(patches.entries, patches.crops, patches.projections, strict=True):
            x0, y0, x1, y1 = entry.box
            assert crop.shape == projection.shape == (1, y1 - y0, x1 - x0)
            single = convscope.deconv(zfnet, images_with_ties[entry.index : entry.index + 1], "conv2", channel=patches.channel)
            assert single.positions[0, 0].tolist() == list(entry.cell)
            torch.testing.assert_close(projection, single.projections[0, 0, :, y0:y1, x0:x1], rtol=1e-4, atol=1e-6)
            # nothing outside the box: the projection of one cell stays in its receptive field
            outside = single.projections[0, 0].clone()
            outside[:, y0:y1, x0:x1] = 0
            assert outside.abs().max() == 0
    crops_only = list(collect_patches(zfnet, images_with_ties, index, projections=False))
    assert all(p.projections is None for p in crops_only)
    torch.testing.assert_close(crops_only[1].crops[0], got[1].crops[0])


def test_channel_figure_and_gallery() -> None:
    from convscope.render.patches import channel_figure, gallery_html

    crops = [torch.rand(3, 10, 10) for _ in range(9)]
    crops[4] = torch.rand(3, 6, 10)  # clipped at the border
    projections = [torch.randn(3, c.shape[1], c.shape[2]) for c in crops]
    figure = channel_figure(crops, projections, [float(v) for v in range(9, 0, -1)])
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[1] > 2 * figure.shape[0] * 0.9
    assert channel_figure(crops, None, [1.0] * 9).shape[1] < figure.shape[1] / 2 + 8
    page = gallery_html(
        "Top-9 patches", {"conv1": [{"channel": 0, "picture": "conv1/channel_0.png", "best": 2.5, "count": 9}]},
        notes=["<b>data</b>"],
    )
    assert 'src="conv1/channel_0.png"' in page and "http" not in page and "&lt;b&gt;" in page


def test_parse_channels() -> None:
    from convscope.cli.patches_cmd import parse_channels

    assert parse_channels("0-3,7,2") == [0, 1, 2, 3, 7]
    assert parse_channels(None) is None
    for bad in ("3-1", "a", ",", "-2"):
        with pytest.raises(BadArgument, match="--channels"):
            parse_channels(bad)


@pytest.mark.parametrize("count,size", [(10, 3), (2, 4), (0, 2), (60000, 7)])
def test_shard_range_covers_in_rank_order(count, size) -> None:
    shards = [shard_range(count, rank, size) for rank in range(size)]
    assert [i for shard in shards for i in shard] == list(range(count))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_ctrl_c_checkpoints_and_resume_finishes_the_same(zfnet, images_with_ties, tmp_path) -> None:
    whole = top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3)
    seen = []

    def interrupt_after_three(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3, progress=interrupt_after_three,
                    checkpoint=tmp_path, checkpoint_every=100)
    saved = torch.load(tmp_path / "state-rank0-of-1.pt", weights_only=True)
    assert saved["position"] == 9 and saved["images"] == 9  # three whole batches, saved on the interrupt
    resumed_progress = []
    resumed = top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3, checkpoint=tmp_path,
                          resume=True, progress=resumed_progress.append)
    assert resumed == whole
    assert resumed_progress[0] == 9 and sum(resumed_progress) == 23  # the bar starts where the run stopped


@pytest.mark.parametrize("chosen", [None, [4, 0, 2]])
def test_table_update_from_maps_equals_the_full_merge(chosen) -> None:
    """The lazy merge (amax, merge only channels some image can enter, argmax only for entrants)
    keeps exactly the table of the full merge of ``peaks``: ties between images, ties inside a
    map, NaN maps, empty maps and batches whose images all lose, over many batches."""
    from convscope.dataset.topk import TopkTable, peaks

    generator = torch.Generator().manual_seed(1)
    index = None if chosen is None else torch.tensor(chosen)
    channels = 6 if chosen is None else len(chosen)
    full = lazy = TopkTable.empty(channels, 4, torch.device("cpu"))
    # Image positions in shuffled order: ties between images must go to the lower position even
    # when it arrives later.
    order = torch.randperm(60, generator=generator)
    position = 0
    entered_late = 0
    for step in range(12):
        batch = 1 + step % 5
        # Small integers: maxima tie across images and inside maps.
        maps = torch.randint(-3, 4, (batch, 6, 3, 5), generator=generator).float()
        maps[0, 1] = 2.0  # a flat map: every cell ties
        if step in (0, 3):
            maps[:, 2] = float("nan")  # a NaN map counts as -inf (first batch: it still fills an empty slot)
        if step >= 8:
            maps[:, 3] -= 10.0  # late images cannot enter channel 3
            maps[:, 0] += step - 6  # but they push earlier ones out of channel 0
        positions = order[position : position + batch]
        position += batch
        full = full.update(*peaks(maps, index), positions)
        before = lazy.images.clone()
        lazy = lazy.update_from_maps(maps, index, positions)
        entered_late += int((lazy.images != before).sum()) if step >= 8 else 0
        torch.testing.assert_close(lazy.values, full.values)
        assert torch.equal(lazy.images, full.images), step
        assert torch.equal(lazy.cells, full.cells), step
    assert entered_late > 0  # the later batches did change the table: not a vacuous comparison


@pytest.mark.parametrize("batch_size", [1, 5, 23])
def test_statistics_equal_a_direct_computation(zfnet, images_with_ties, batch_size) -> None:
    """Mean of spatial means, largest cell, and fraction of images with a cell above 0, per channel,
    in the mining pass: equal to the same numbers from every map kept, for any batching."""
    modules = dict(zfnet.module.named_modules())
    with torch.no_grad(), convscope.capture(zfnet.module, {n: modules[zfnet.stages[n]] for n in LAYERS}) as cap:
        zfnet.module.eval()
        zfnet.module(images_with_ties)
    index = top_patches(zfnet, images_with_ties, LAYERS, top=3, batch_size=batch_size,
                        channels={"conv1": [3, 0], "conv3": None, "conv5": None}, statistics=True)
    assert index.statistics is not None
    for name in LAYERS:
        maps = cap.last(name).double()
        ids = list(index.channels[name])
        rows = index.statistics[name]
        assert len(rows) == len(ids)
        for row, channel in zip(rows, ids, strict=True):
            plane = maps[:, channel]
            # to float32 rounding: the miner runs the BatchNorm-folded copy of the network
            assert row["mean"] == pytest.approx(plane.mean((1, 2)).mean().item(), rel=1e-5, abs=1e-6)
            assert row["max"] == pytest.approx(plane.amax().item(), rel=1e-5, abs=1e-6)
            assert row["firing"] == pytest.approx((plane.flatten(1).amax(1) > 0).double().mean().item())
    # Some channel fires on some images only: the fraction is tested, not only 0 and 1.
    assert any(0 < row["firing"] < 1 for rows in index.statistics.values() for row in rows)
    plain = top_patches(zfnet, images_with_ties, LAYERS, top=3, batch_size=batch_size,
                        channels={"conv1": [3, 0], "conv3": None, "conv5": None})
    assert plain.statistics is None and plain.layers == index.layers


def test_statistics_survive_an_interrupt_and_resume(zfnet, images_with_ties, tmp_path) -> None:
    whole = top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3, statistics=True)
    calls = []

    def interrupt(n: int) -> None:
        calls.append(n)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3, progress=interrupt, checkpoint=tmp_path,
                    checkpoint_every=100, statistics=True)
    resumed = top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3, checkpoint=tmp_path, resume=True,
                          statistics=True)
    assert resumed == whole
    # A checkpoint made without statistics cannot be resumed with them (nor the other way round).
    with pytest.raises(BadArgument, match="statistics"):
        top_patches(zfnet, images_with_ties, LAYERS, top=4, batch_size=3, checkpoint=tmp_path, resume=True)
    with pytest.raises(BadArgument, match="activation"):
        top_patches(zfnet, images_with_ties, LAYERS, statistics=True, rank="relevance", target=0)
