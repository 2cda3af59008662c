"""Receptive fields, output sizes and the summary, checked by hand and against the modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope
from convscope.models.load import load_model
from convscope.probes.geometry import Geometry, cell_box, conv_output_size, trace, window_of


def _rf_by_name(name: str) -> dict[str, tuple[int, int, float, bool]]:
    result = convscope.summary(load_model(name, weights="random"))
    return {l.name: (l.receptive_field, l.jump, l.start, l.rf_exact) for l in result.layers}


def test_alexnet_receptive_fields_by_hand() -> None:
    rf = _rf_by_name("alexnet")
    # conv1 11/4; pool 3/2; conv2 5/1 p2; pool 3/2; conv3..5 3/1 p1; pool 3/2.
    assert rf["features.0"][:2] == (11, 4)
    assert rf["features.2"][:2] == (19, 8)
    assert rf["features.3"][:2] == (51, 8)
    assert rf["features.5"][:2] == (67, 16)
    assert rf["features.6"][:2] == (99, 16)
    assert rf["features.8"][:2] == (131, 16)
    assert rf["features.10"][:2] == (163, 16)  # conv5
    assert rf["features.12"][:2] == (195, 32)
    # start: conv1 centre of first cell = 0.5 + (5 - 2) = 3.5
    assert rf["features.0"][2] == 3.5
    assert all(v[3] for k, v in rf.items() if k.startswith("features"))


def test_zfnet_conv5_field() -> None:
    rf = _rf_by_name("zfnet")
    assert rf["features.0"][:2] == (7, 2)
    assert rf["features.12"][:2] == (139, 16)


def test_output_size_formula_matches_every_window_layer() -> None:
    for name in ("alexnet", "zfnet", "vgg16", "zfnet_mnist", "alexnet_cifar"):
        loaded = load_model(name, weights="random")
        x = torch.zeros((1, *loaded.preprocess.input_size))
        for call in trace(loaded.module, x):
            window = window_of(call.module)
            if window is None or call.input_shape is None:
                continue
            (k, _), (s, _), (p, _), (d, _) = window
            predicted = conv_output_size(call.input_shape[-1], k, s, p, d)
            assert predicted == call.output_shape[-1], (name, call.name)


def test_residual_networks_are_marked_approximate() -> None:
    result = convscope.summary(load_model("resnet18", weights="random"))
    by_name = {}
    for layer in result.layers:
        by_name.setdefault(layer.name, []).append(layer)
    assert by_name["conv1"][0].rf_exact and by_name["conv1"][0].receptive_field == 7
    assert by_name["maxpool"][0].receptive_field == 11
    # After the first residual sum the chain is broken: flagged, and it follows the main path.
    second_relu = by_name["layer1.0.relu"][1]
    assert not second_relu.rf_exact and second_relu.receptive_field == 27
    assert any("approximate" in note for note in result.notes)


def test_summary_totals_equal_parameter_counts() -> None:
    for name in ("alexnet", "resnet18", "efficientnet_lite0", "zfnet_mnist"):
        loaded = load_model(name, weights="random")
        result = convscope.summary(loaded)
        params = sum(p.numel() for p in loaded.module.parameters())
        assert result.total_params == params
        assert sum(l.params for l in result.layers) == params  # reused modules counted once
    assert convscope.summary(load_model("alexnet", weights="random")).total_params == 61_100_840


def test_summary_mult_adds_by_hand() -> None:
    result = convscope.summary(load_model("alexnet", weights="random"))
    conv1 = next(l for l in result.layers if l.name == "features.0")
    assert conv1.mult_adds == 55 * 55 * 64 * 3 * 11 * 11
    assert conv1.output_shape == (1, 64, 55, 55)
    assert conv1.activation_bytes == 55 * 55 * 64 * 4
    assert (conv1.kernel, conv1.stride, conv1.padding) == ((11, 11), (4, 4), (2, 2))


def test_summary_input_size_and_bad_sizes() -> None:
    loaded = load_model("alexnet", weights="random")
    result = convscope.summary(loaded, input_size=(3, 227, 227))
    assert next(l for l in result.layers if l.name == "features.0").output_shape == (1, 64, 56, 56)
    with pytest.raises(convscope.ConvscopeError, match=r"--input-size: \(3, 8, 8\) does not fit alexnet"):
        convscope.summary(loaded, input_size=(3, 8, 8))


def test_cell_box() -> None:
    geo = Geometry(size=11, jump=4, start=3.5)
    assert cell_box(geo, 0, 0, (224, 224)) == (0, 0, 9, 9)  # 3.5 +- 5.5 clipped at 0
    assert cell_box(geo, 10, 2, (224, 224)) == (38, 6, 49, 17)
    assert cell_box(geo, 54, 54, (224, 224)) == (214, 214, 224, 224)


def test_zero_pad_shifts_start() -> None:
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 1, 3, stride=2))
    calls = trace(model, torch.zeros(1, 1, 8, 8))
    assert calls[-1].geometry == Geometry(size=3, jump=2, start=1.5, exact=True)
    model = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 1, 3, stride=2))
    assert trace(model, torch.zeros(1, 1, 8, 8))[-1].geometry.start == 0.5


# -- survivors of the mutmut runs (tools/mutate.py geometry): lookups by layer name, xyxy boxes,
# output sizes and the window of a layer ------------------------------------------------------------


class _TwoBlocks(nn.Module):
    """block (conv 3x3 s1 -> ReLU) then block1 (conv 2x2 s2): names that share a prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU())
        self.block1 = nn.Conv2d(1, 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block1(self.block(x))


def test_layer_geometry_by_container_and_leaf_name() -> None:
    from convscope.probes.geometry import Geometry, layer_geometries, layer_geometry

    x = torch.zeros(1, 1, 8, 8)
    # conv 3x3 pad 1: size 3, jump 1, start 0.5 + (1 - 1) = 0.5; the ReLU keeps it.
    first = Geometry(size=3.0, jump=1.0, start=0.5)
    # then 2x2 stride 2: size 3 + 1 = 4, jump 2, start 0.5 + 0.5 = 1.0.
    second = Geometry(size=4.0, jump=2.0, start=1.0)
    model = _TwoBlocks()
    # "block" is a container: its last leaf (block.1, the ReLU), not block1 (shared prefix).
    assert layer_geometry(model, x, "block") == first
    assert layer_geometry(model, x, "block.0") == first
    assert layer_geometry(model, x, "block1") == second
    assert layer_geometries(model, x, ["block1", "block", "block.0"]) == {
        "block1": second, "block": first, "block.0": first}
    with pytest.raises(KeyError, match="blo"):
        layer_geometry(model, x, "blo")
    with pytest.raises(KeyError, match="missing"):
        layer_geometries(model, x, ["block", "missing"])


def test_layer_geometry_takes_the_last_call_of_a_reused_layer() -> None:
    from convscope.probes.geometry import layer_geometries, layer_geometry

    conv = nn.Conv2d(1, 1, 3, padding=1)
    model = nn.Sequential(conv, conv)  # the same module called twice: size 3, then 5
    x = torch.zeros(1, 1, 8, 8)
    assert layer_geometry(model, x, "0").size == 5.0
    assert layer_geometries(model, x, ["0"])["0"].size == 5.0


def test_cell_boxes_xyxy_order_and_clipping() -> None:
    from convscope.probes.geometry import Geometry, cell_box, cell_boxes_xyxy

    geo = Geometry(size=4.0, jump=2.0, start=1.0)
    # cell (row 0, col 3): centre y 1, x 7 -> rows -1..3 clipped to 0..3, cols 5..9 clipped
    # to the width 8: (x0, y0, x1, y1) = (5, 0, 8, 3). cell (2, 1): y 5 -> 3..7, x 3 -> 1..5.
    assert cell_boxes_xyxy(geo, [0, 2], [3, 1], (10, 8)) == [(5, 0, 8, 3), (1, 3, 5, 7)]
    assert cell_box(geo, 0, 3, (10, 8)) == (0, 5, 3, 8)
    with pytest.raises(ValueError):
        cell_boxes_xyxy(geo, [0, 1], [0], (10, 8))


def test_conv_output_size_default_dilation_is_one() -> None:
    from convscope.probes.geometry import conv_output_size

    # (10 + 0 - 1*(3-1) - 1) // 1 + 1 = 8; dilation 2 would give 6.
    assert conv_output_size(10, 3, 1, 0) == 8
    assert conv_output_size(10, 3, 1, 0, 2) == 6
    # (224 + 2*3 - 6 - 1) // 2 + 1 = 112
    assert conv_output_size(224, 7, 2, 3) == 112


def test_window_of_keeps_a_non_square_kernel_in_height_width_order() -> None:
    from convscope.probes.geometry import window_of

    conv = nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1))
    assert window_of(conv) == ((3, 5), (1, 2), (1, 2), (2, 1))


def test_window_of_same_and_valid_padding_strings() -> None:
    from convscope.probes.geometry import window_of

    # "same" with k=3, d=2: padding d*(k-1)//2 = 2 per side; k=(5, 3), d=1: (2, 1).
    same = nn.Conv2d(1, 1, 3, padding="same", dilation=2)
    assert window_of(same) == ((3, 3), (1, 1), (2, 2), (2, 2))
    assert window_of(nn.Conv2d(1, 1, (5, 3), padding="same"))[2] == (2, 1)
    assert window_of(nn.Conv2d(1, 1, 3, padding="valid"))[2] == (0, 0)
    assert window_of(nn.ReLU()) is None


def test_grid_origins_with_and_without_the_border_strip() -> None:
    # Occlusion's window grid is spatial arithmetic and lives in geometry (issue 23).
    from convscope.probes.geometry import grid_origins

    assert grid_origins(20, 8, 5) == (0, 5, 10)  # 20 - 8 = 12 leaves a 2-pixel strip uncovered
    assert grid_origins(20, 8, 5, cover_border=True) == (0, 5, 10, 15)  # one more window covers it
    assert grid_origins(18, 8, 5, cover_border=True) == (0, 5, 10) == grid_origins(18, 8, 5)
    assert grid_origins(8, 8, 3, cover_border=True) == (0,)


def test_batchnorm_has_global_statistics_only_without_running_statistics() -> None:
    from convscope.probes.geometry import has_global_statistics

    assert not has_global_statistics(nn.BatchNorm2d(3).eval())
    assert has_global_statistics(nn.BatchNorm2d(3).train())
    assert has_global_statistics(nn.BatchNorm2d(3, track_running_stats=False).eval())
    assert has_global_statistics(nn.GroupNorm(1, 3)) and has_global_statistics(nn.InstanceNorm2d(3))
    assert not has_global_statistics(nn.ReLU())


def test_deconv_remembers_fields_per_size_and_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    from convscope.methods import deconvnet
    from convscope.probes import geometry

    loaded = load_model("alexnet", weights="random", seed=0)
    x = torch.rand(1, 3, 224, 224)
    first = deconvnet.deconv(loaded, x, "conv3", top=2)
    assert geometry.known_geometry(loaded.module, (3, 224, 224), "features.7") is not None
    traced: list[int] = []

    def counted(*args: object) -> list[geometry.LayerCall]:
        traced.append(1)
        return trace(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(deconvnet, "trace", counted)
    again = deconvnet.deconv(loaded, x, "conv3", top=2)
    assert traced == [] and torch.equal(again.boxes, first.boxes)  # remembered: no trace, same boxes
    deconvnet.deconv(loaded, torch.rand(1, 3, 160, 160), "conv3", top=2)
    assert traced == [1]  # another size is traced
    loaded.module.features[0].stride = (2, 2)  # another tree: traced again, with its own field
    changed = deconvnet.deconv(loaded, x, "conv3", top=2)
    assert traced == [1, 1] and not torch.equal(changed.boxes, first.boxes)
