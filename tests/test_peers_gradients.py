"""Gradient methods against captum and pytorch-grad-cam, on real photos and real weights.

Models: the pretrained default (EfficientNet-Lite0, offline weights) and seeded random AlexNet
and VGG16. Peers are test-only dependencies (``pip install captum grad-cam``).

Alignment notes:

* pytorch-grad-cam's GradCAM: ReLU of the weighted sum, min-max, ``cv2.resize`` (bilinear,
  half-pixel centres), min-max again. Ours resizes then scales once; bilinear interpolation
  commutes with the affine scaling, so the maps agree to float rounding.
* captum hooks ``nn.ReLU`` modules only. EfficientNet-Lite uses ``nn.ReLU6``, which captum
  leaves alone (plain gradients). Our rule treats ReLU6 as ReLU followed by a clip at 6, so the
  peer runs on a copy where every ``ReLU6`` is ``nn.ReLU`` followed by ``clamp(max=6)``.
* captum's ``NeuronDeconvolution`` differentiates one neuron (seed 1); the deconvnet seeds the
  kept activation with its own value, so the neuron selector is ``a * a.detach()``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from convscope.methods.deconvnet import deconv
from convscope.methods.gradcam import gradcam, gradcam_plus_plus, guided_gradcam
from convscope.methods.guided import guided_backprop, saliency
from convscope.models.load import load_model
from convscope.probes.layers import resolve_layer
from convscope.types import LoadedModel

captum_attr = pytest.importorskip("captum.attr")
pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

pytestmark = [pytest.mark.peer, pytest.mark.filterwarnings("ignore::UserWarning")]

TIGER_CAT = 282


@pytest.fixture(scope="module")
def alexnet() -> LoadedModel:
    return load_model("alexnet", "random", seed=0, device="cpu")


@pytest.fixture(scope="module")
def vgg16() -> LoadedModel:
    return load_model("vgg16", "random", seed=0, device="cpu")


@pytest.fixture(scope="module")
def models(default_model, alexnet, vgg16) -> dict[str, LoadedModel]:  # type: ignore[no-untyped-def]
    return {"efficientnet_lite0": default_model, "alexnet": alexnet, "vgg16": vgg16}


def batch_for(loaded: LoadedModel, name: str, photo: Any, coffee: Any, *, pair: bool = False) -> torch.Tensor:
    # One image keeps each comparison to a few seconds; Grad-CAM also checks a batch of two
    # (N images, N targets) on the smaller models.
    images = [photo, coffee] if pair and name != "vgg16" else [photo]
    return loaded.preprocess.to_tensor(images)


def relu6_as_relu_then_clip(module: nn.Module) -> nn.Module:
    class ClipAt6(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(x, max=6.0)

    twin = copy.deepcopy(module)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.Sequential(nn.ReLU(), ClipAt6()))
    return twin


def captum_network(loaded: LoadedModel) -> nn.Module:
    has_relu6 = any(isinstance(m, nn.ReLU6) for m in loaded.module.modules())
    return relu6_as_relu_then_clip(loaded.module) if has_relu6 else loaded.module


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to ``tol`` of the largest magnitude (random-weight gradients are ~1e-5)."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=tol)


@pytest.fixture
def clean_grads(models) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """pytorch-grad-cam calls ``loss.backward()``, which fills every parameter's ``.grad``."""
    yield
    for loaded in models.values():
        for p in loaded.module.parameters():
            p.grad = None


NAMES = ["efficientnet_lite0", "alexnet", "vgg16"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("ours", "peer"), [(gradcam, GradCAM), (gradcam_plus_plus, GradCAMPlusPlus)])
def test_gradcam_equals_pytorch_grad_cam(models, name, ours, peer, photo, coffee, clean_grads) -> None:  # type: ignore[no-untyped-def]
    loaded = models[name]
    x = batch_for(loaded, name, photo, coffee, pair=True)
    result = ours(loaded, x)
    _, layer = resolve_layer(loaded, loaded.cam_layer)
    with peer(model=loaded.module, target_layers=[layer]) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in result.targets])
    assert result.maps.shape == expected.shape
    np.testing.assert_allclose(result.maps.numpy(), expected, rtol=0, atol=1e-4)
    if name == "efficientnet_lite0":
        assert result.labels[0] in ("tabby, tabby cat", "tiger cat", "Egyptian cat")


def test_gradcam_non_default_layer_and_target_equals_pytorch_grad_cam(default_model, photo, clean_grads) -> None:  # type: ignore[no-untyped-def]
    x = default_model.preprocess.to_tensor([photo])
    result = gradcam(default_model, x, target="tiger cat", layer="stage5")
    assert result.targets.tolist() == [TIGER_CAT]
    _, layer = resolve_layer(default_model, "stage5")
    with GradCAM(model=default_model.module, target_layers=[layer]) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(TIGER_CAT)])
    np.testing.assert_allclose(result.maps.numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_guided_backprop_equals_captum(models, name, photo, coffee) -> None:  # type: ignore[no-untyped-def]
    loaded = models[name]
    x = batch_for(loaded, name, photo, coffee)
    result = guided_backprop(loaded, x)
    expected = captum_attr.GuidedBackprop(captum_network(loaded)).attribute(x.clone(), target=result.targets)
    assert_close_scaled(result.attributions, expected)
    assert result.warnings == ()


def test_captum_leaves_relu6_alone_we_do_not(default_model, photo) -> None:  # type: ignore[no-untyped-def]
    x = default_model.preprocess.to_tensor([photo])
    ours = guided_backprop(default_model, x)
    captum_plain = captum_attr.GuidedBackprop(default_model.module).attribute(x.clone(), target=ours.targets)
    plain = saliency(default_model, x, target=ours.targets)
    assert_close_scaled(captum_plain, plain.attributions)  # captum: just the gradient
    assert not torch.allclose(ours.attributions, plain.attributions, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_saliency_equals_captum(models, name, photo, coffee) -> None:  # type: ignore[no-untyped-def]
    loaded = models[name]
    x = batch_for(loaded, name, photo, coffee)
    result = saliency(loaded, x)
    expected = captum_attr.Saliency(loaded.module).attribute(x.clone(), target=result.targets, abs=True)
    assert_close_scaled(result.maps, expected.amax(dim=1))
    assert_close_scaled(result.attributions.abs(), expected)


@pytest.mark.parametrize(("name", "layer", "channel"), [
    ("efficientnet_lite0", "stage3", 7),
    ("alexnet", "conv4", 11),
    ("vgg16", "block4", 3),
])
def test_deconv_equals_captum_neuron_deconvolution(models, name, layer, channel, photo, coffee) -> None:  # type: ignore[no-untyped-def]
    loaded = models[name]
    x = batch_for(loaded, name, photo, coffee)
    network = captum_network(loaded)
    path, _ = resolve_layer(loaded, layer)
    peer = captum_attr.NeuronDeconvolution(network, dict(network.named_modules())[path])

    whole = deconv(loaded, x, layer, channel=channel, location="all")
    expected = peer.attribute(
        x.clone(), neuron_selector=lambda out: (out[:, channel] * out[:, channel].detach()).sum(dim=(1, 2))
    )
    assert_close_scaled(whole.projections[:, 0], expected)

    strongest = deconv(loaded, x, layer, channel=channel, location="max")
    for n in range(x.shape[0]):
        r, c = strongest.positions[n, 0].tolist()
        neuron = peer.attribute(x[n : n + 1].clone(), neuron_selector=(channel, r, c))
        assert_close_scaled(strongest.projections[n, 0], strongest.values[n, 0] * neuron[0])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0])


def randomized_top(loaded: LoadedModel, prefixes: tuple[str, ...], seed: int = 1) -> LoadedModel:
    """A copy whose weights under ``prefixes`` are redrawn (He-normal, seeded); BN stays."""
    module = copy.deepcopy(loaded.module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith(prefixes) and param.dim() > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return LoadedModel(
        module=module, name=loaded.name, preprocess=loaded.preprocess, categories=loaded.categories,
        stages=loaded.stages, cam_layer=loaded.cam_layer, first_conv=loaded.first_conv,
    )


def test_sanity_randomizing_top_layers_changes_cam_maps(default_model, photo, coffee, record_property) -> None:  # type: ignore[no-untyped-def]
    """Adebayo et al. 2018 (model-parameter randomisation): an explanation that depends on what
    the model learned must change when the top layers are re-initialised.

    Classifier and head conv (``features.8``) are redrawn, targets kept. Measured Spearman rank
    correlations (original vs randomised, per image, chelsea/coffee): Grad-CAM -0.12 / -0.14,
    guided Grad-CAM 0.55 / 0.12, guided backprop 0.999 / 0.984. Unrelated maps score ~0, identical
    ones 1. Thresholds: Grad-CAM < 0.5 (its weights come straight from the redrawn layers);
    guided Grad-CAM < 0.75 (it inherits the guided-backprop factor, which barely changes -- the
    known insensitivity of guided backprop that the paper reports, asserted here as > 0.9 so a
    randomisation that wrecked the whole network would not pass unnoticed).
    """
    x = default_model.preprocess.to_tensor([photo, coffee])
    base_cam = gradcam(default_model, x)
    base_guided_cam = guided_gradcam(default_model, x, target=base_cam.targets)
    base_guided = guided_backprop(default_model, x, target=base_cam.targets)
    random_top = randomized_top(default_model, ("classifier", "features.8"))
    cam = gradcam(random_top, x, target=base_cam.targets)
    guided_cam = guided_gradcam(random_top, x, target=base_cam.targets)
    guided = guided_backprop(random_top, x, target=base_cam.targets)
    for i in range(2):
        rho_cam = spearman(base_cam.maps[i], cam.maps[i])
        rho_guided_cam = spearman(base_guided_cam.maps[i], guided_cam.maps[i])
        rho_guided = spearman(base_guided.maps[i], guided.maps[i])
        record_property(f"spearman_image{i}", (rho_cam, rho_guided_cam, rho_guided))
        print(f"image {i}: Spearman gradcam {rho_cam:.3f}, guided gradcam {rho_guided_cam:.3f}, "
              f"guided backprop {rho_guided:.3f}")
        assert rho_cam < 0.5
        assert rho_guided_cam < 0.75
        assert rho_guided > 0.9


def test_resnet_reused_relu_and_residuals_equal_captum(photo) -> None:  # type: ignore[no-untyped-def]
    """ResNet calls each block's ReLU twice and adds residuals: the rule must hit every call,
    and deconv must take the layer's last call (the deconv pass stops after ``layer2``)."""
    loaded = load_model("resnet18", "random", seed=0, device="cpu")
    x = loaded.preprocess.to_tensor([photo])
    guided = guided_backprop(loaded, x)
    expected = captum_attr.GuidedBackprop(loaded.module).attribute(x.clone(), target=guided.targets)
    assert_close_scaled(guided.attributions, expected)
    relu = loaded.module.layer2[1].relu
    whole = deconv(loaded, x, "layer2.1.relu", channel=5, location="all")
    expected = captum_attr.NeuronDeconvolution(loaded.module, relu).attribute(
        x.clone(), neuron_selector=lambda out: (out[:, 5] * out[:, 5].detach()).sum(dim=(1, 2))
    )
    assert_close_scaled(whole.projections[:, 0], expected)
    assert not whole.boxes_exact  # the residual sum leaves the plain chain


def test_guided_gradcam_equals_captum_guided_times_pytorch_grad_cam(alexnet, photo, clean_grads) -> None:  # type: ignore[no-untyped-def]
    x = alexnet.preprocess.to_tensor([photo])
    result = guided_gradcam(alexnet, x, target=TIGER_CAT)
    _, layer = resolve_layer(alexnet, alexnet.cam_layer)
    with GradCAM(model=alexnet.module, target_layers=[layer]) as cam:
        cam_map = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(TIGER_CAT)]))
    guided = captum_attr.GuidedBackprop(alexnet.module).attribute(x.clone(), target=TIGER_CAT)
    assert_close_scaled(result.attributions, guided * cam_map[:, None], tol=1e-4)
