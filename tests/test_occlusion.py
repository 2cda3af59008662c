"""Occlusion sensitivity: exact against a naive one-copy-at-a-time loop, incremental path
taken where it should be, validation, and the model left as found."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convscope.errors import BadArgument, BadTarget, UnknownLayer
from convscope.methods.occlusion import chain as inc
from convscope.methods.occlusion import grid_origins, occlusion, resolve_fill
from convscope.models.load import load_model, wrap_model
from convscope.preprocess import IMAGENET, Preprocess


class Temperature(nn.Module):
    """Sharpens random-weight logits so the probabilities compared are far from uniform."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def naive(module: nn.Module, image: torch.Tensor, target: int, window: int, stride: int, fill: float,
          cover_border: bool = False, layer: nn.Module | None = None, channel: int = 0) -> dict[str, torch.Tensor]:
    """One occluded copy per forward pass, the whole network each time."""
    height, width = image.shape[-2:]
    rows = grid_origins(height, window, stride, cover_border)
    cols = grid_origins(width, window, stride, cover_border)
    probability = torch.zeros(len(rows), len(cols))
    top = torch.zeros(len(rows), len(cols), dtype=torch.int64)
    top_p = torch.zeros(len(rows), len(cols))
    activation = torch.zeros(len(rows), len(cols))
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o[0, channel].sum())) if layer else None
    module.eval()
    try:
        with torch.no_grad():
            clean = torch.softmax(module(image), 1)[0, target]
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    copy = image.clone()
                    copy[:, :, r : r + window, c : c + window] = fill
                    probs = torch.softmax(module(copy), 1)[0]
                    probability[i, j] = probs[target]
                    top_p[i, j], top[i, j] = probs.max(0)
                    if layer is not None:
                        activation[i, j] = seen[-1]
    finally:
        if handle is not None:
            handle.remove()
    pixel = torch.zeros(height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            pixel[r : r + window, c : c + window] += float(clean - probability[i, j])
            count[r : r + window, c : c + window] += 1
    pixel = torch.where(count > 0, pixel / count.clamp_min(1), 0.0).float()
    return {"probability": probability, "top_class": top, "top_probability": top_p,
            "activation": activation, "pixel_drop": pixel, "clean": clean}


def assert_matches(result, expected, *, atol: float = 1e-5) -> None:
    torch.testing.assert_close(result.probability[0], expected["probability"], rtol=0, atol=atol)
    torch.testing.assert_close(result.top_probability[0], expected["top_probability"], rtol=0, atol=atol)
    torch.testing.assert_close(result.pixel_drop[0], expected["pixel_drop"], rtol=0, atol=atol)
    torch.testing.assert_close(result.drop[0], expected["clean"] - expected["probability"], rtol=0, atol=atol)
    # Ties aside, the most probable class is the same everywhere.
    assert (result.top_class[0] == expected["top_class"]).float().mean() > 0.99


def sharpened(name: str, factor: float, **kwargs) -> tuple[nn.Module, object]:
    loaded = load_model(name, weights="random", seed=0, **kwargs)
    module = nn.Sequential(loaded.module, Temperature(factor)).eval()
    return module, wrap_model(module, preprocess=loaded.preprocess, categories=loaded.categories)


@pytest.fixture(scope="module")
def alexnet_small():
    return sharpened("alexnet", 300.0)


def test_hand_computed_linear_model() -> None:
    # logit0 = sum of pixels, logit1 = 0: with a zero image and fill 1, every window gives
    # logit0 = window**2, so p0 = sigmoid(4) at every position and the clean p0 = 0.5.
    conv = nn.Conv2d(1, 1, 1, bias=False)
    linear = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        linear.weight.zero_()
        linear.weight[0].fill_(1.0)
    model = wrap_model(nn.Sequential(conv, nn.Flatten(), linear), preprocess=Preprocess(None, 4, (0.0,), (1.0,), 1),
                       categories=("yes", "no"))
    result = occlusion(model, torch.zeros(1, 1, 4, 4), 0, window=2, stride=1, fill=1.0)
    expected = 1 / (1 + math.exp(-4))
    assert result.probability.shape == (1, 3, 3)
    torch.testing.assert_close(result.probability, torch.full((1, 3, 3), expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(result.drop, torch.full((1, 3, 3), 0.5 - expected), rtol=0, atol=1e-7)
    assert result.top_class.eq(0).all() and result.labels == ("yes",)
    assert result.class_names == {0: "yes"}
    # Corner pixels are covered by one window, the centre ones by four: all average the same.
    torch.testing.assert_close(result.pixel_drop, torch.full((1, 4, 4), 0.5 - expected), rtol=0, atol=1e-7)
    assert result.stats.mode == "incremental" and result.stats.incremental_layers == ("0",)


def test_grid_and_border() -> None:
    assert grid_origins(224, 16, 8) == tuple(range(0, 209, 8))
    assert len(grid_origins(224, 16, 8)) == 27
    assert grid_origins(20, 8, 5) == (0, 5, 10)
    assert grid_origins(20, 8, 5, cover_border=True) == (0, 5, 10, 15)  # last window clipped to 5 px


def test_fill_names_are_pixel_colours() -> None:
    grey = resolve_fill("grey", IMAGENET.mean, IMAGENET.std, 3)
    assert grey == pytest.approx(tuple((0.5 - m) / s for m, s in zip(IMAGENET.mean, IMAGENET.std)))
    assert resolve_fill("black", (0.5,) * 3, (0.5,) * 3, 3) == (-1.0, -1.0, -1.0)
    assert resolve_fill(0.25, IMAGENET.mean, IMAGENET.std, 3) == (0.25, 0.25, 0.25)
    with pytest.raises(BadArgument, match="--fill purple: is not grey, black, white or a number"):
        resolve_fill("purple", IMAGENET.mean, IMAGENET.std, 3)


def test_alexnet_incremental_equals_naive(alexnet_small) -> None:
    module, loaded = alexnet_small
    torch.manual_seed(1)
    image = torch.randn(1, 3, 128, 128)
    result = occlusion(loaded, image, None, window=16, stride=8, fill=0.0, batch_size=50)
    assert result.stats.mode == "incremental"
    assert "0.features.3" in result.stats.incremental_layers  # conv2 recomputed only near the square
    assert result.stats.work_fraction < 0.9
    expected = naive(module, image, int(result.targets[0]), 16, 8, 0.0)
    assert expected["probability"].std() > 1e-3  # the comparison is not between flat maps
    assert_matches(result, expected)


def test_full_mode_equals_exact_mode(alexnet_small) -> None:
    _, loaded = alexnet_small
    torch.manual_seed(2)
    image = torch.randn(1, 3, 80, 80)
    exact = occlusion(loaded, image, window=12, stride=6, batch_size=7)
    full = occlusion(loaded, image, window=12, stride=6, batch_size=64, mode="full")
    assert full.stats.mode == "full" and full.stats.work_fraction == 1.0 and full.stats.incremental_layers == ()
    torch.testing.assert_close(exact.probability, full.probability, rtol=0, atol=1e-5)
    assert exact.targets.tolist() == full.targets.tolist()


def test_border_windows_like_captum(alexnet_small) -> None:
    module, loaded = alexnet_small
    torch.manual_seed(3)
    image = torch.randn(1, 3, 90, 90)
    result = occlusion(loaded, image, 5, window=20, stride=12, fill=-0.5, cover_border=True)
    assert result.row_origins == (0, 12, 24, 36, 48, 60, 72)  # the last window is clipped to 18 px
    assert_matches(result, naive(module, image, 5, 20, 12, -0.5, cover_border=True))


@pytest.mark.parametrize(
    ("name", "size", "window", "stride", "expect", "last", "fraction"),
    [
        ("zfnet_cifar", 32, 8, 4, "0.features.4", "0.features.10", 0.6755),
        # residual MBConv blocks as units; the chain is cut where recomputing patches stops paying
        ("efficientnet_lite0", 64, 16, 8, "0.features.2.1", "0.features.3.0", 0.8653),
        ("resnet18", 64, 16, 8, "0.layer1.0", "0.layer1.1", 0.9274),  # BasicBlocks with a reused ReLU
    ],
)
def test_other_architectures_equal_naive(name: str, size: int, window: int, stride: int, expect: str, last: str,
                                         fraction: float) -> None:
    module, loaded = sharpened(name, 50.0)
    torch.manual_seed(4)
    image = torch.randn(1, loaded.preprocess.channels, size, size)
    result = occlusion(loaded, image, window=window, stride=stride, fill=0.3)
    assert result.stats.mode == "incremental"
    assert expect in result.stats.incremental_layers
    # where the chain stops, and the work it saves: both move if the cut-off rule changes
    assert result.stats.incremental_layers[-1] == last
    assert result.stats.work_fraction == pytest.approx(fraction, abs=1e-3)
    assert_matches(result, naive(module, image, int(result.targets[0]), window, stride, 0.3))


class FanOut(nn.Module):
    """A tensor of the chain is read twice (a skip the chain walker cannot see)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.source = source
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 8 * 8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.pool(y) + (y if self.source == "conv" else x).mean(dim=(1, 2, 3), keepdim=True)
        return self.head(z.flatten(1)) * 20


@pytest.mark.parametrize(("source", "mode", "layers"), [("conv", "incremental", ("conv",)), ("input", "full", ())])
def test_hidden_fan_out_is_caught(source: str, mode: str, layers: tuple[str, ...]) -> None:
    # conv output read twice: the chain shrinks to the conv; the input read twice: no chain.
    model = FanOut(source).eval()
    torch.manual_seed(5)
    image = torch.randn(1, 3, 16, 16)
    result = occlusion(model, image, window=4, stride=2)
    assert (result.stats.mode, result.stats.incremental_layers) == (mode, layers)
    assert_matches(result, naive(model, image, int(result.targets[0]), 4, 2, 0.0))


def test_tiny_cnn_with_reused_relu(tiny_cnn) -> None:
    torch.manual_seed(6)
    image = torch.randn(1, 3, 16, 16)
    result = occlusion(tiny_cnn, image, window=4, stride=3)
    # The shared ReLU ends the chain: only conv1 runs on patches.
    assert result.stats.incremental_layers == ("conv1",)
    assert_matches(result, naive(tiny_cnn, image, int(result.targets[0]), 4, 3, 0.0))


@pytest.mark.parametrize("layer", ["conv2", "0.features.3", "conv5"])
def test_feature_map_totals(alexnet_small, layer: str) -> None:
    module, loaded = alexnet_small
    loaded = wrap_model(module, preprocess=loaded.preprocess, categories=loaded.categories)
    loaded.stages.update({"conv2": "0.features.4", "conv5": "0.features.11"})
    torch.manual_seed(7)
    image = torch.randn(1, 3, 80, 80)
    result = occlusion(loaded, image, 0, window=16, stride=8, layer=layer)
    path = loaded.stages.get(layer, layer)
    layer_module = module.get_submodule(path)
    with torch.no_grad():
        seen = []
        handle = layer_module.register_forward_hook(lambda m, i, o: seen.append(o[0].sum((1, 2))))
        module(image)
        handle.remove()
    strongest = int(seen[0].argmax())
    assert result.channels.tolist() == [strongest]
    torch.testing.assert_close(result.clean_activation, seen[0][strongest : strongest + 1], rtol=1e-5, atol=1e-4)
    expected = naive(module, image, 0, 16, 8, 0.0, layer=layer_module, channel=strongest)
    torch.testing.assert_close(result.activation[0], expected["activation"], rtol=1e-5, atol=1e-3)
    assert expected["activation"].std() > 1e-2


def test_feature_map_inside_a_block() -> None:
    module, loaded = sharpened("efficientnet_lite0", 50.0)
    torch.manual_seed(8)
    image = torch.randn(1, 3, 64, 64)
    path = "0.features.2.1.depthwise.conv"
    result = occlusion(loaded, image, window=16, stride=8, layer=path, channel=5)
    # The block holding the layer runs whole; the chain stops before it.
    assert "0.features.2.0" in result.stats.incremental_layers
    assert "0.features.2.1" not in result.stats.incremental_layers
    expected = naive(module, image, int(result.targets[0]), 16, 8, 0.0, layer=module.get_submodule(path), channel=5)
    torch.testing.assert_close(result.activation[0], expected["activation"], rtol=1e-5, atol=1e-3)


def test_label_target_and_batch(alexnet_small) -> None:
    _, loaded = alexnet_small
    torch.manual_seed(9)
    images = torch.randn(2, 3, 64, 64)
    result = occlusion(loaded, images, "tabby", window=32, stride=16)
    assert result.targets.tolist() == [281, 281]
    assert result.labels == (loaded.categories[281],) * 2 == ("tabby",) * 2
    assert result.probability.shape == (2, 3, 3) and result.pixel_drop.shape == (2, 64, 64)
    single = occlusion(loaded, images[1:], 281, window=32, stride=16)
    torch.testing.assert_close(result.probability[1], single.probability[0], rtol=0, atol=1e-6)


def test_progress_reports_every_copy(alexnet_small) -> None:
    _, loaded = alexnet_small
    done: list[int] = []
    occlusion(loaded, torch.zeros(1, 3, 64, 64), window=16, stride=8, batch_size=10, progress=done.append)
    assert sum(done) == 49 and max(done) <= 10


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"window": 0}, BadArgument, r"--window 0: must be a whole number of pixels, at least 1"),
        ({"window": 65}, BadArgument, r"--window 65: is larger than the 64x64 input"),
        ({"stride": 0}, BadArgument, r"--stride 0: must be a whole number of pixels, at least 1"),
        ({"stride": -2}, BadArgument, r"--stride -2: must be"),
        ({"target": 1000}, BadTarget, r"--class 1000: is out of range"),
        ({"target": "not a class"}, BadTarget, r"--label not a class: is not a class of custom"),
        ({"layer": "nope"}, UnknownLayer, r"nope: no such layer"),
        ({"layer": "0.classifier.1"}, BadArgument, r"--layer 0.classifier.1: has no \(N, C, H, W\) feature-map output"),
        ({"layer": "0.features.3", "channel": 999}, BadArgument, r"--channel 999: is not a channel of 0.features.3 \(0..191\)"),
        ({"mode": "fast"}, BadArgument, r"--mode fast: is not a mode \(choose from: exact, approximate, full\)"),
        ({"fill": [0.0, 1.0]}, BadArgument, r"gives 2 values for 3 input channels"),
    ],
)
def test_bad_arguments(alexnet_small, assert_no_side_effects, kwargs, error, message) -> None:
    module, loaded = alexnet_small
    with pytest.raises(error, match=message) as caught:
        assert_no_side_effects(module, lambda: occlusion(loaded, torch.zeros(1, 3, 64, 64), **kwargs))
    assert "\n" not in str(caught.value)


def test_model_left_as_found_even_when_interrupted(alexnet_small, assert_no_side_effects) -> None:
    module, loaded = alexnet_small
    module.train()
    module[0].features[0].weight.requires_grad_(False)
    children = [(name, id(child)) for name, child in module.named_modules()]

    def stop(n: int) -> None:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            assert_no_side_effects(module, lambda: occlusion(loaded, torch.zeros(1, 3, 64, 64), progress=stop))
        # Modules swapped for the replay are back in place.
        assert [(name, id(child)) for name, child in module.named_modules()] == children
        result = assert_no_side_effects(module, lambda: occlusion(loaded, torch.zeros(1, 3, 64, 64)))
        assert result.stats.mode == "incremental"
        assert [(name, id(child)) for name, child in module.named_modules()] == children
    finally:
        module.eval()
        module[0].features[0].weight.requires_grad_(True)


def test_cli_writes_the_three_maps(tmp_path) -> None:
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from convscope.cli.main import app

    photo = tmp_path / "cat.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(photo)
    out = tmp_path / "out"
    args = ["occlusion", str(photo), "--model", "alexnet_cifar", "--weights", "random", "--window", "8",
            "--stride", "4", "--layer", "conv2", "--fill", "black", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    names = {"cat_occlusion_probability.png", "cat_occlusion_drop.png", "cat_occlusion_classes.png",
             "cat_occlusion_activation.png", "cat_occlusion_activation_map.png", "occlusion.json", "manifest.json"}
    assert {p.name for p in out.iterdir()} == names
    record = json.loads((out / "occlusion.json").read_text())[0]
    assert record["grid"] == [7, 7] and record["layer"] == "conv2" and record["mode"] == "incremental"
    assert sum(record["classes_shown"].values()) == 49
    legend = Image.open(out / "cat_occlusion_classes.png")
    assert legend.size[0] >= 224 + 220  # the map, enlarged to 224 px, and its legend
    raw = CliRunner().invoke(app, [*args[:-2], "--raw", "-o", str(tmp_path / "raw")])
    assert raw.exit_code == 0, raw.output
    assert Image.open(tmp_path / "raw" / "cat_occlusion_classes.png").size[0] == 32 + 220
    bad = CliRunner().invoke(app, [*args[:6], "--window", "0", "-o", str(out)])
    assert bad.exit_code == 2 and "--window 0: must be a whole number of pixels, at least 1" in bad.output
    assert "Traceback" not in bad.output


def test_bands_group_copies_with_alike_changed_regions() -> None:
    from convscope.methods.occlusion import plan

    # Alternating large and small changed regions: bands of the same size pay for less.
    extents = [plan.Extents(first=(0,) * 6, size=(5, 1, 5, 1, 5, 1))]
    assert plan.bands(extents, [1.0], 6, 3, overhead=1.0) == [[0, 2, 4], [1, 3, 5]]
    # Without a cost per band, single copies are as cheap as anything.
    assert len(plan.bands(extents, [1.0], 6, 3, overhead=0.0)) == 6
    # Costs count every unit, weighted: index 1 is the expensive one here.
    two = [plan.Extents((0,) * 3, (2, 1, 1)), plan.Extents((0,) * 3, (1, 9, 1))]
    assert plan.bands(two, [1.0, 1.0], 3, 1)[0] == [1]
    assert plan.bands([], [], 5, 2) == [[0, 1], [2, 3], [4]]


def test_classifier_runs_on_many_chunks_at_once(alexnet_small, monkeypatch) -> None:
    from convscope.methods.occlusion import chain

    module, loaded = alexnet_small
    head = module[0].classifier[-1]
    calls: list[int] = []
    handle = head.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    torch.manual_seed(10)
    image = torch.randn(1, 3, 96, 96)
    try:
        together = occlusion(loaded, image, window=16, stride=8, batch_size=20)
        copies = together.stats.copies
        assert copies == 121 and calls[-1] == copies  # one classifier pass for all 121 copies
        calls.clear()
        monkeypatch.setattr(chain, "SUFFIX_BUDGET_BYTES", 1)  # room for one chunk
        apart = occlusion(loaded, image, window=16, stride=8, batch_size=20)
        assert max(calls[2:]) <= 2 * 20 and len(calls) > 4
    finally:
        handle.remove()
    torch.testing.assert_close(together.probability, apart.probability, rtol=0, atol=1e-6)
    assert torch.equal(together.top_class, apart.top_class)


def test_approximate_mode_on_the_default_model(default_model, photo, assert_no_side_effects, monkeypatch) -> None:
    from convscope.methods.occlusion import precision

    # The speed probe decides by timing, which a loaded machine skews: this test is about the
    # numbers, so half precision is taken whenever the hardware has it.
    monkeypatch.setattr(precision, "speedup", lambda *args: 10.0)

    image = default_model.preprocess.to_tensor(photo)
    exact = occlusion(default_model, image, window=32, stride=16)
    approx = assert_no_side_effects(
        default_model.module, lambda: occlusion(default_model, image, window=32, stride=16, mode="approximate")
    )
    assert all(p.dtype == torch.float32 for p in default_model.module.parameters())
    assert approx.stats.mode == "incremental" and approx.targets.tolist() == exact.targets.tolist()
    if precision.low_precision(torch.device("cpu")) is None:  # no native bfloat16 here: computed exactly
        assert approx.stats.precision == "float32"
        torch.testing.assert_close(approx.probability, exact.probability, rtol=0, atol=1e-5)
        return
    assert approx.stats.precision == "bfloat16"
    difference = (approx.probability - exact.probability).abs().max()
    assert 0 < difference < 0.05  # really computed differently, and still close
    ranks = torch.stack([exact.drop.flatten().argsort().argsort(), approx.drop.flatten().argsort().argsort()]).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.9  # the same places matter


def test_approximate_mode_without_fast_bfloat16_is_exact(alexnet_small, monkeypatch) -> None:
    from convscope.methods.occlusion import precision

    _, loaded = alexnet_small
    monkeypatch.setattr(precision, "low_precision", lambda device: None)
    torch.manual_seed(11)
    image = torch.randn(1, 3, 64, 64)
    approx = occlusion(loaded, image, window=16, stride=8, mode="approximate")
    exact = occlusion(loaded, image, window=16, stride=8)
    assert approx.stats.precision == "float32"
    torch.testing.assert_close(approx.probability, exact.probability, rtol=0, atol=0)


def test_non_square_images_and_grids_equal_naive(alexnet_small) -> None:
    # Rows and columns differ in count and extent: a swapped axis anywhere in the incremental
    # chain, its plans or its bands would show here (every square test hides it).
    module, loaded = alexnet_small
    torch.manual_seed(5)
    image = torch.randn(1, 3, 96, 144)
    layer = dict(module.named_modules())["0.features.3"]
    result = occlusion(loaded, image, None, window=16, stride=8, fill=0.0, layer="0.features.3", channel=2,
                       batch_size=40)
    assert result.stats.mode == "incremental" and (len(result.row_origins), len(result.col_origins)) == (11, 17)
    # the watched layer sits inside the chain, which goes on past it (its totals come from the chain)
    assert result.stats.incremental_layers == tuple(f"0.features.{i}" for i in range(6))
    expected = naive(module, image, int(result.targets[0]), 16, 8, 0.0, layer=layer, channel=2)
    assert_matches(result, expected)
    torch.testing.assert_close(result.activation[0], expected["activation"], rtol=1e-5, atol=1e-3)


def test_a_single_row_of_windows_equals_naive() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), Temperature(30.0)).eval()
    loaded = wrap_model(net, preprocess=Preprocess(resize=None, crop=8))
    image = torch.randn(1, 3, 8, 40)  # window 8: one row, five columns
    result = occlusion(loaded, image, None, window=8, stride=8, fill=0.5)
    assert result.row_origins == (0,) and result.col_origins == (0, 8, 16, 24, 32)
    assert_matches(result, naive(net, image, int(result.targets[0]), 8, 8, 0.5))


def test_speedup_probe_times_both_precisions_after_a_warm_up() -> None:
    # Stand-in networks that take a known time per call (a slow first call, as real kernels
    # have): the probe must give float32 time / low-precision time, warm-up excluded.
    import time

    from convscope.methods.occlusion.precision import speedup

    class Sleeper(nn.Module):
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds, self.calls = seconds, []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append((x.shape[0], x.dtype))
            time.sleep(0.25 if len(self.calls) == 1 else self.seconds)
            return x

    full, half = Sleeper(0.08), Sleeper(0.01)
    ratio = speedup(full, half, torch.zeros(1, 3, 4, 4), torch.bfloat16, copies=4)
    # 8x when sleeps are exact; a loaded machine's oversleep (5-10 ms) pulls it down towards 4.5x;
    # the ratio upside down would be 0.125.
    assert 3.0 < ratio < 9.0, ratio
    assert full.calls == [(4, torch.float32)] * 3 and half.calls == [(4, torch.bfloat16)] * 3


def _small_net() -> tuple[nn.Module, object]:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), Temperature(20.0)).eval()
    return net, wrap_model(net, preprocess=Preprocess(resize=None, crop=8))


def test_approximate_mode_probe_and_its_fallbacks(monkeypatch) -> None:
    # The speed-up probe gets the model, its half-precision twin, one image and up to 4 copies;
    # a measured 1.15x (the threshold) keeps half precision, anything less runs exact and says why.
    from convscope.methods.occlusion import precision

    net, loaded = _small_net()
    image = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(precision, "low_precision", lambda device: torch.bfloat16)
    calls = []

    def probe(ratio: float):
        def fake(module, twin, first, low, copies):
            calls.append((module is net, next(twin.parameters()).dtype, tuple(first.shape), low, copies))
            return ratio
        return fake

    monkeypatch.setattr(precision, "speedup", probe(1.15))
    kept = occlusion(loaded, image, window=4, stride=4, mode="approximate", batch_size=3, layer="2", channel=1)
    assert calls == [(True, torch.bfloat16, (1, 3, 8, 8), torch.bfloat16, 3)]
    assert kept.stats.precision == "bfloat16" and kept.stats.fallback == "" and kept.activation is not None
    monkeypatch.setattr(precision, "speedup", probe(1.0))
    slow = occlusion(loaded, image, window=4, stride=4, mode="approximate")
    assert slow.stats.precision == "float32"
    assert slow.stats.fallback == ("bfloat16 measured 1.00x the float32 speed on this model and machine "
                                   "(needs 1.15x): ran exact (float32)")
    monkeypatch.setattr(precision, "low_precision", lambda device: None)
    none = occlusion(loaded, image, window=4, stride=4, mode="approximate")
    assert none.stats.fallback == "cpu has no fast bfloat16/float16 arithmetic: ran exact (float32)"
    assert occlusion(loaded, image, window=4, stride=4).stats.fallback == ""  # exact mode: nothing to explain


def test_smallest_settings_and_their_errors() -> None:
    _, loaded = _small_net()
    image = torch.randn(1, 3, 4, 4)
    one = occlusion(loaded, image, window=1, stride=2, fill="black", layer="0", channel=0)  # the smallest window
    assert one.row_origins == (0, 2) and one.activation is not None and int(one.channels[0]) == 0
    with pytest.raises(BadArgument, match=r"^--batch-size 0: must be at least 1$"):
        occlusion(loaded, image, window=2, stride=2, batch_size=0)
    with pytest.raises(BadArgument, match=r"^--fill inf: must be a finite number$"):
        occlusion(loaded, image, window=2, stride=2, fill=float("inf"))
    # one mean and std for three channels (a grey-statistics model fed RGB): repeated per channel
    assert resolve_fill("white", [0.5], [0.25], 3) == (2.0, 2.0, 2.0)


def test_result_without_a_layer_and_the_class_names_it_carries() -> None:
    # logit "left" = sum of the left half, logit "right" = 0.9 x the right half: on an image of
    # ones "left" wins (96 vs 86.4) until a 4x4 square (fill 0) covers part of the left half.
    head = nn.Linear(3 * 8 * 8, 2, bias=False)
    with torch.no_grad():
        columns = torch.arange(8).repeat(3 * 8)
        head.weight.copy_(torch.stack([(columns < 4).float(), 0.9 * (columns >= 4).float()]))
    loaded = wrap_model(nn.Sequential(nn.Flatten(), head), preprocess=Preprocess(resize=None, crop=8),
                        categories=["left", "right"])
    result = occlusion(loaded, torch.ones(1, 3, 8, 8), window=4, stride=4, fill=0.0)
    assert result.activation is None and result.clean_activation is None and result.channels is None
    assert result.layer is None and result.targets.tolist() == [0]
    assert result.top_class[0].tolist() == [[1, 0], [1, 0]]  # a square on the left half: "right" wins
    assert result.class_names == {0: "left", 1: "right"}  # the target's name and every top class's


def test_a_chain_without_multiply_adds_costs_a_whole_pass_per_copy() -> None:
    # Only pools: the chain is incremental, and with no multiply-adds to count its work per copy
    # is reported as one full pass (1.0), not something larger.
    net = nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(), Temperature(5.0)).eval()
    loaded = wrap_model(net, preprocess=Preprocess(resize=None, crop=8))
    torch.manual_seed(0)
    result = occlusion(loaded, torch.randn(1, 3, 8, 8), window=2, stride=2)
    assert result.stats.mode == "incremental" and result.stats.incremental_layers == ("0", "1")
    assert result.stats.work_fraction == 1.0 and result.stats.copies == 16


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)])
def test_the_chain_stops_before_a_normalisation_over_the_map(norm: nn.Module) -> None:
    # Its statistics depend on every cell, so a patch changes the whole map (probes/geometry.py
    # decides it: no reach): the chain ends before it and the result still equals the naive loop.
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), norm, nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), Temperature(20.0)).eval()
    loaded = wrap_model(net, preprocess=Preprocess(resize=None, crop=16))
    image = torch.randn(1, 3, 16, 16)
    result = occlusion(loaded, image, window=4, stride=4, fill=0.5)
    assert result.stats.mode == "incremental" and result.stats.incremental_layers == ("0", "1")
    assert_matches(result, naive(net, image, int(result.targets[0]), 4, 4, 0.5))


# -- found by the hand-made mutation round (issue 14): a span the stride divides exactly, a chain
# long enough to reach the cut-off; the values are worked out by hand in the comments -------------


def test_cover_border_adds_no_window_when_the_stride_divides_the_span() -> None:
    # (224 - 16) / 8 = 26 exactly: the last window ends on the border already -> 27 positions.
    assert grid_origins(224, 16, 8, cover_border=True) == tuple(range(0, 209, 8))
    assert len(grid_origins(224, 16, 8, cover_border=True)) == 27
    assert grid_origins(12, 4, 4, cover_border=True) == (0, 4, 8)
    # A remainder still adds the clipped window: (13 - 4) / 4 = 2.25 -> 4 positions.
    assert grid_origins(13, 4, 4, cover_border=True) == (0, 4, 8, 12)


class _ConvChain(nn.Module):
    """14 same-size 3x3 convolutions (+ReLU) on a 1x32x32 input, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(14):
            layers += [nn.Conv2d(2 if layers else 1, 2, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 32 * 32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_incremental_chain_stops_at_the_recompute_fraction() -> None:
    # Window 8, stride 8 on 32 px: four origins 0, 8, 16, 24. Each 3x3 convolution widens a
    # square's changed rows by one on each side, clipped at the map's edges. After k of them
    # the border squares change 8 + k rows; the inner ones 8 + 2k, or 16 + k once the edge
    # clips them (k >= 8). For k >= 8 the mean is 12 + k, and the mean changed area
    # (12 + k)^2 / 32^2 of the map:
    #   k = 12: 24^2 / 1024 = 0.5625 <= 0.6   k = 13: 25^2 / 1024 = 0.610 > 0.6
    # So the chain holds conv 1..12 and their ReLUs (features.0..23) and stops before conv 13.
    assert inc.FULL_RECOMPUTE_FRACTION == 0.6
    model = _ConvChain()
    loaded = wrap_model(model, preprocess=Preprocess(None, 32, (0.0,), (1.0,), 1), categories=("a", "b", "c"))
    result = occlusion(loaded, torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)), 0,
                       window=8, stride=8, fill=0.0)
    assert result.stats.mode == "incremental"
    assert result.stats.incremental_layers == tuple(f"features.{i}" for i in range(24))
    # Work per copy: convs 13 and 14 and the head in full; conv k <= 12 on a patch between
    # the mean changed area (exact cells) and the inner squares' area (chunks run each band
    # at its largest member).
    macs = [1 * 2 * 9] + [2 * 2 * 9] * 13  # per output cell
    head = 2 * 32 * 32 * 3
    full = sum(m * 32 * 32 for m in macs) + head
    tail = sum(m * 32 * 32 for m in macs[12:]) + head
    border = [min(32, 8 + k) for k in range(1, 13)]
    inner = [min(32, 8 + 2 * k, 16 + k) for k in range(1, 13)]
    low = tail + sum(m * ((b + i) / 2) ** 2 for m, b, i in zip(macs, border, inner))
    high = tail + sum(m * i * i for m, i in zip(macs, inner))
    assert low / full - 1e-9 <= result.stats.work_fraction <= high / full + 1e-9  # 0.431 .. 0.533
