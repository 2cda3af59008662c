"""Activation maps, feature maps and filters: hand computations on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convscope
from convscope.errors import BadArgument, UnknownLayer
from convscope.models.load import load_model, wrap_model
from convscope.preprocess import Preprocess


def _handset(model):
    return wrap_model(model, preprocess=Preprocess(resize=None, crop=6, mean=(0.0,), std=(1.0,), channels=1),
                      categories=["a", "b"])


def test_handset_activation_map_by_hand(tiny_handset, assert_no_side_effects) -> None:
    loaded = _handset(tiny_handset)
    assert loaded.stages == {"stage1": "relu", "stage2": "pool"}  # measured: the map the pool reads, then the pool
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = 1.0
    x[0, 0, 5, 5] = 3.0
    result = assert_no_side_effects(tiny_handset, lambda: convscope.activation_maps(loaded, x))
    # conv with all-ones 3x3 kernel = 3x3 box sums; channel 0 bias 0, channel 1 bias -1; ReLU; mean.
    box = F.conv2d(x, torch.ones(1, 1, 3, 3))[0, 0]
    expected_raw = (box.clamp_min(0) + (box - 1).clamp_min(0)) / 2
    assert result.layers == ("stage1", "stage2")
    torch.testing.assert_close(result.raw["stage1"][0], expected_raw)
    assert expected_raw[0, 0] == 0.5 and expected_raw[3, 3] == 2.5  # 1/2 and (3 + 2)/2
    up = F.interpolate(expected_raw[None, None], size=(6, 6), mode="bilinear", align_corners=False)[0, 0]
    expected_map = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(result.maps["stage1"][0], expected_map)
    assert result.maps["stage1"].shape == (1, 6, 6) and result.maps["stage1"].dtype == torch.float32


def test_one_forward_pass_captures_every_layer(monkeypatch) -> None:
    loaded = load_model("alexnet", weights="random")
    calls = []
    handle = loaded.module.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        result = convscope.activation_maps(loaded, torch.randn(2, 3, 224, 224))
    finally:
        handle.remove()
    assert len(calls) == 1
    assert result.layers == ("conv1", "conv2", "conv3", "conv4", "conv5")
    for name in result.layers:
        assert result.maps[name].shape == (2, 224, 224)
        assert result.maps[name].min() >= 0 and result.maps[name].max() <= 1
    assert result.raw["conv5"].shape == (2, 13, 13)


def test_activation_maps_by_module_path_and_bad_layers() -> None:
    loaded = load_model("tiny", weights="random")
    result = convscope.activation_maps(loaded, torch.randn(1, 3, 32, 32), layers=["features.0", "conv2"])
    assert result.layers == ("features.0", "conv2")
    with pytest.raises(UnknownLayer, match="nope: no such layer in tiny"):
        convscope.activation_maps(loaded, torch.randn(1, 3, 32, 32), layers=["nope"])
    with pytest.raises(UnknownLayer, match=r"classifier: has output shape \(1, 10\), not a \(N, C, H, W\)"):
        convscope.activation_maps(loaded, torch.randn(1, 3, 32, 32), layers=["classifier"])


def test_feature_maps_orders(tiny_cnn) -> None:
    loaded = wrap_model(tiny_cnn, preprocess=Preprocess(resize=None, crop=16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = tiny_cnn.conv1(x)
    first = convscope.feature_maps(loaded, x, layer="conv1", max_channels=3)
    assert first.channels.tolist() == [0, 1, 2]
    torch.testing.assert_close(first.maps, reference[:, :3])
    strongest = convscope.feature_maps(loaded, x, layer="conv1", max_channels=2, order="activation")
    means = reference.mean(dim=(0, 2, 3))
    assert strongest.channels.tolist() == means.topk(2).indices.tolist()
    with pytest.raises(BadArgument, match="--order: must be 'index' or 'activation'"):
        convscope.feature_maps(loaded, x, layer="conv1", order="random")


def test_filters_normalised_per_filter() -> None:
    loaded = load_model("alexnet", weights="random")
    result = convscope.conv_filters(loaded)
    assert result.layer == "features.0"
    assert result.weights.shape == (64, 3, 11, 11)
    flat = result.normalized.flatten(1)
    torch.testing.assert_close(flat.min(dim=1).values, torch.zeros(64))
    torch.testing.assert_close(flat.max(dim=1).values, torch.ones(64))
    deeper = convscope.conv_filters(loaded, layer="features.3")
    assert deeper.strongest_input.tolist() == deeper.weights.flatten(2).norm(dim=2).argmax(dim=1).tolist()
    # a stage alias names the ReLU after a conv: it means that conv; a module path is taken as given
    assert convscope.conv_filters(loaded, layer="conv1").layer == "features.0"
    with pytest.raises(UnknownLayer, match="features.1: is a ReLU, not a Conv2d"):
        convscope.conv_filters(loaded, layer="features.1")
