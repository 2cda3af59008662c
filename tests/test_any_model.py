"""Any model: layouts measured (NCHW, NHWC, tokens), stages and the default CAM layer from the
traced graph, and Grad-CAM equal to pytorch-grad-cam (with its documented reshape_transform) on
torchvision and timm architectures at their real sizes.

Untouched random weights give maps near 1e-15 that no comparison can use, so each network's
BatchNorm statistics are re-estimated on the bundled photos first (``_calibrated``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import recalibrated
from torch import nn

import convscope
from convscope.errors import UnknownLayer
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess
from convscope.probes.hooks import capture
from convscope.probes.layers import list_layers, map_layer
from convscope.probes.layout import Layout, decide, measure_module
from convscope.validate import image_batch

torchvision = pytest.importorskip("torchvision")


# ---------------------------------------------------------------- a hand-made model of every layout


class _ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _Tokens(nn.Module):
    """(N, C, H, W) -> (N, 1 + H·W, C): a class token, then the positions row by row."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.arange(channels, dtype=torch.float32)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)


class _Head(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].mean(dim=1)


class _Layouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.to_nhwc = _ToNHWC()
        self.mix = nn.Linear(5, 6)
        self.act = nn.GELU()
        self.down = nn.Conv2d(6, 7, 2, stride=2)
        self.tokens = _Tokens(7)
        self.norm = nn.LayerNorm(7)
        self.head = _Head()
        self.fc = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.mix(self.to_nhwc(self.conv(x))))
        x = self.down(x.permute(0, 3, 1, 2))
        return self.fc(self.head(self.norm(self.tokens(x))))


SIZE = (3, 8, 12)  # not square: rows and columns cannot be confused


def test_layouts_of_a_hand_made_model_are_measured() -> None:
    model = _Layouts().eval()
    measured = measure_module(model, input_size=SIZE)
    kinds = {path: measured.layouts[path].kind for path in ("conv", "to_nhwc", "mix", "act", "down", "tokens", "norm", "head", "fc")}
    assert kinds == {"conv": "NCHW", "to_nhwc": "NHWC", "mix": "NHWC", "act": "NHWC", "down": "NCHW",
                     "tokens": "tokens", "norm": "tokens", "head": "vector", "fc": "vector"}
    assert measured.layouts["mix"].grid == (8, 12) and measured.layouts["mix"].channels == 6
    assert measured.layouts["tokens"].grid == (4, 6) and measured.layouts["tokens"].extra_tokens == 1
    assert measured.output.kind == "vector" and measured.output.channels == 4
    # Stages: the map each downsampling reads, then the last map before pooling; the pure
    # axis move is never named.
    assert measured.stages == {"stage1": "act", "stage2": "norm"}
    assert measured.cam_layer == "norm"


def test_conversions_value_by_value() -> None:
    model = _Layouts().eval()
    loaded = wrap_model(model, preprocess=Preprocess(resize=None, crop=8), categories=list("abcd"))
    x = torch.randn(2, *SIZE)
    names = {"conv": "conv", "mix": "mix", "tokens": "tokens"}
    found = {name: map_layer(loaded, name, SIZE) for name in names}
    with torch.no_grad(), capture(model, {n: f.module for n, f in found.items()},
                                  layouts={n: f.layout for n, f in found.items()}) as store:
        model(x)
    conv = model.conv(x)
    mixed = model.mix(conv.permute(0, 2, 3, 1))
    torch.testing.assert_close(store.last("conv"), conv)
    # NHWC read as NCHW: channel c at (i, j) is the NHWC tensor's [i, j, c].
    torch.testing.assert_close(store.last("mix"), mixed.permute(0, 3, 1, 2))
    assert store.last("mix")[1, 4, 2, 7] == mixed[1, 2, 7, 4]
    # Tokens: the class token dropped, position k = i·w + j at (i, j) of a 4×6 grid.
    down = model.down(model.act(mixed).permute(0, 3, 1, 2))
    tokens = model.tokens(down)
    grid = store.last("tokens")
    assert grid.shape == (2, 7, 4, 6)
    for i, j in ((0, 0), (1, 5), (3, 2)):
        torch.testing.assert_close(grid[:, :, i, j], tokens[:, 1 + i * 6 + j, :])
        torch.testing.assert_close(grid[:, :, i, j], down[:, :, i, j])


def test_gradients_flow_through_a_converted_layer() -> None:
    """Grad-CAM at an NHWC layer equals a hand computation on the NHWC tensor."""
    model = _Layouts().eval()
    loaded = wrap_model(model, preprocess=Preprocess(resize=None, crop=8), categories=list("abcd"))
    x = torch.randn(1, *SIZE)
    ours = convscope.gradcam(loaded, x, target=2, layer="mix")
    conv = model.conv(x)
    mixed = model.mix(conv.permute(0, 2, 3, 1)).detach().requires_grad_(True)
    rest = model.act(mixed).permute(0, 3, 1, 2)
    score = model.fc(model.head(model.norm(model.tokens(model.down(rest)))))[0, 2]
    (grad,) = torch.autograd.grad(score, mixed)
    weights = grad.mean(dim=(1, 2))  # NHWC: the spatial axes are 1 and 2
    raw = (weights[0][None, None, :] * mixed[0].detach()).sum(dim=-1).clamp_min(0)
    torch.testing.assert_close(ours.raw[0], raw, rtol=1e-5, atol=1e-6)
    assert loaded.module is model and not model._forward_hooks  # nothing left behind


def test_a_layer_that_is_not_a_map_is_refused_in_one_line() -> None:
    loaded = wrap_model(_Layouts().eval(), preprocess=Preprocess(resize=None, crop=8), categories=list("abcd"))
    with pytest.raises(UnknownLayer) as caught:
        convscope.gradcam(loaded, torch.randn(1, *SIZE), layer="head")
    assert "head: has output shape (1, 7), not a (N, C, H, W) feature map (layout vector 7)" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("shape", "labels", "kind"), [
    ((1, 7, 7, 7), ("N", "C", "H", "W"), "NCHW"),   # shapes cannot tell: the graph decides
    ((1, 7, 7, 7), ("N", "H", "W", "C"), "NHWC"),
    ((1, 7, 7, 7), None, "other"),                  # nothing can tell: refused
    ((1, 96, 56, 56), None, "NCHW"),
    ((1, 56, 56, 96), None, "NHWC"),
    ((1, 197, 768), None, "tokens"),
    ((1, 768, 196), ("N", "C", "L"), "other"),
    ((1, 1000), None, "vector"),
])
def test_decide_from_shapes_and_traced_labels(shape, labels, kind) -> None:
    assert decide(shape, labels, (224, 224)).kind == kind


def test_list_layers_shows_the_layout() -> None:
    loaded = wrap_model(_Layouts().eval(), preprocess=Preprocess(resize=None, crop=8), categories=list("abcd"))
    rows = {row["name"]: row["layout"] for row in list_layers(loaded)}
    assert rows["mix"] == "NHWC" and rows["tokens"] == "tokens" and rows["conv"] == "NCHW" and rows["fc"] == "vector"


def test_the_trace_runs_once_per_model() -> None:
    model = _Layouts().eval()
    calls = []
    model.conv.register_forward_hook(lambda *args: calls.append(1))
    loaded = wrap_model(model, preprocess=Preprocess(resize=None, crop=8), categories=list("abcd"))
    before = len(calls)
    for _ in range(3):
        map_layer(loaded, "mix", SIZE)
    assert len(calls) - before <= 1  # at most the one measuring forward, then the cache


# ---------------------------------------------------------------- stages and default layers


# pytorch-grad-cam's documented target layers (README "Chosing the target layer").
DOCUMENTED = {
    "resnet18": "layer4",
    "vgg16": "features.30",
    "densenet121": "features.norm5",
    "mobilenet_v3_small": "features.12",
    "efficientnet_b0": "features.8",
    "convnext_tiny": "features.7",
    "regnet_y_400mf": "trunk_output",
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_default_cam_layer_is_the_documented_one(name) -> None:
    module = getattr(torchvision.models, name)().eval()
    assert measure_module(module, input_size=(3, 224, 224)).cam_layer == DOCUMENTED[name]


def test_stages_are_the_maps_each_downsampling_reads() -> None:
    resnet = measure_module(torchvision.models.resnet18().eval(), input_size=(3, 224, 224))
    assert resnet.stages == {"stage1": "relu", "stage2": "layer1", "stage3": "layer2", "stage4": "layer3", "stage5": "layer4"}
    effnet = measure_module(torchvision.models.efficientnet_b0().eval(), input_size=(3, 224, 224))
    # The block before each stride-2 block, never the expansion inside it.
    assert effnet.stages == {"stage1": "features.1", "stage2": "features.2", "stage3": "features.3",
                             "stage4": "features.5", "stage5": "features.8"}
    swin = measure_module(torchvision.models.swin_t().eval(), input_size=(3, 224, 224))
    assert swin.layouts["features.1"].kind == "NHWC" and swin.cam_layer == "norm"


def test_timm_stages_come_from_feature_info() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18").eval()
    measured = measure_module(model, input_size=(3, 224, 224))
    assert list(measured.stages.values()) == [info["module"] for info in model.feature_info]
    assert measured.cam_layer == "layer4"


# ---------------------------------------------------------------- Grad-CAM against pytorch-grad-cam


_calibrated = recalibrated


def _peer_cam(module: nn.Module, layer: str, layout: Layout, batch: torch.Tensor, targets: list[int]) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:  # the peer's documented recipe
        if layout.kind == "NHWC":
            return tensor.permute(0, 3, 1, 2)
        if layout.kind == "tokens":
            assert layout.grid is not None
            body = tensor[:, layout.extra_tokens:, :]
            return body.reshape(tensor.size(0), *layout.grid, tensor.size(2)).permute(0, 3, 1, 2)
        return tensor

    with GradCAM(model=module, target_layers=[module.get_submodule(layer)], reshape_transform=reshape_transform) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(t) for t in targets])


TORCHVISION_CASES = [
    ("mobilenet_v3_small", "features.12.0"),   # NCHW inside the last block
    ("convnext_tiny", "features.7.2.block.4"),  # NHWC: the Linear after LayerNorm, per position
    ("regnet_y_400mf", "trunk_output.block4"),
    ("densenet121", "features.denseblock4"),    # the default (norm5) is checked by hand below
    ("efficientnet_b0", "features.7"),
    ("swin_t", "features.7.1.norm2"),           # NHWC
]


def _batch_for(loaded, photos) -> torch.Tensor:
    return image_batch(loaded, photos)


@pytest.mark.peer
@pytest.mark.parametrize(("name", "second"), TORCHVISION_CASES, ids=[c[0] for c in TORCHVISION_CASES])
def test_gradcam_equals_pytorch_grad_cam_on_torchvision(name, second, photo) -> None:
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)().eval()
    loaded = wrap_model(module)
    batch = _batch_for(loaded, [photo])
    _calibrated(module, batch)
    layers = [second] if name == "densenet121" else [loaded.cam_layer, second]
    for layer in layers:
        found = map_layer(loaded, layer)
        result = convscope.gradcam(loaded, batch, layer=layer)  # each image's top-1 class
        ours = result.maps.numpy()
        peer = _peer_cam(module, found.path, found.layout, batch, result.targets.tolist())
        assert ours.max() > 0.5, f"{name} {layer}: an empty map compares nothing"
        np.testing.assert_allclose(ours, peer, atol=1e-4, err_msg=f"{name} at {layer} ({found.layout.describe()})")


@pytest.mark.peer
def test_densenet_default_layer_reads_norm5_before_the_in_place_relu(photo) -> None:
    """The peer reads norm5 after DenseNet's ``F.relu(inplace=True)`` has overwritten it; ours is
    the BatchNorm output, as a hand computation with a clean copy shows."""
    torch.manual_seed(0)
    module = torchvision.models.densenet121().eval()
    loaded = wrap_model(module)
    batch = _batch_for(loaded, [photo])
    _calibrated(module, batch)
    ours = convscope.gradcam(loaded, batch, target=281)
    assert loaded.cam_layer == "features.norm5"
    features = module.features(batch).detach().requires_grad_(True)
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.relu(features), 1).flatten(1)
    score = module.classifier(pooled)[0, 281]
    (grad,) = torch.autograd.grad(score, features)
    raw = (grad.mean(dim=(2, 3))[0, :, None, None] * features[0].detach()).sum(0).clamp_min(0)
    torch.testing.assert_close(ours.raw[0], raw, rtol=1e-4, atol=1e-6)


TIMM_CASES = [
    ("resnet18", "layer3.1"),
    ("convnext_atto", "stages.3.blocks.1.mlp.fc1"),  # timm's ConvNeXt MLP runs NHWC
    ("efficientnet_b0", "blocks.5"),
    ("vit_tiny_patch16_224", "blocks.11.norm1"),     # tokens: 14×14 grid after a class token
]


@pytest.mark.peer
@pytest.mark.parametrize(("name", "second"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_gradcam_equals_pytorch_grad_cam_on_timm(name, second, photo) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    module = timm.create_model(name).eval()
    loaded = wrap_model(module)
    batch = _batch_for(loaded, [photo])
    _calibrated(module, batch)
    if name.startswith("vit"):  # no BatchNorm: widen the weights so the maps are not flat
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.mul_(1.5)
    layers = [second] if name.startswith("vit") else [loaded.cam_layer, second]
    for layer in layers:
        found = map_layer(loaded, layer)
        result = convscope.gradcam(loaded, batch, layer=layer)  # each image's top-1 class
        ours = result.maps.numpy()
        peer = _peer_cam(module, found.path, found.layout, batch, result.targets.tolist())
        assert ours.max() > 0.5
        np.testing.assert_allclose(ours, peer, atol=1e-4, err_msg=f"timm {name} at {layer} ({found.layout.describe()})")
