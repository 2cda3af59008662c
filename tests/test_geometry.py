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
