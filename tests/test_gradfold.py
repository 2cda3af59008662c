"""The input-gradient copy (probes.gradfold): same forward, BatchNorm's backward merged into the
convolution; gradients equal to the original network's on real weights and a real photo."""

from __future__ import annotations

import pytest
import torch
from conftest import skimage_photo
from PIL import Image
from torch import nn

from convscope.models.load import load_model
from convscope.probes.gradfold import _InputGradConvBN, input_gradient_copy


def _input_gradient(network: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = network(leaf)
        (grad,) = torch.autograd.grad(logits[:, target].sum(), leaf)
    return logits.detach(), grad


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_gradients_equal_the_networks_own(name: str) -> None:
    loaded = load_model(name, weights="pretrained" if name.startswith("efficientnet") else "random", seed=0)
    net = loaded.module.eval()
    photo = Image.open(skimage_photo("chelsea.png")).convert("RGB")
    x = loaded.preprocess.to_tensor([photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    twin = input_gradient_copy(net, x)
    merged = [m for m in twin.modules() if isinstance(m, _InputGradConvBN)]
    assert len(merged) >= 20  # every conv + BatchNorm pair of these networks
    # Lite0's five TF-"same" pads: the four before depthwise layers grow into their kernels, the
    # stem's stays (it would add 21 taps per output to save copying a 3-channel photo)
    pads = [sum(isinstance(m, nn.ConstantPad2d) for m in n.modules()) for n in (net, twin)]
    assert pads == ([5, 1] if name.startswith("efficientnet") else [0, 0])
    assert not any(p.requires_grad for p in twin.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # original untouched
    logits, grad = _input_gradient(net, x, 285)
    twin_logits, twin_grad = _input_gradient(twin, x, 285)
    assert torch.equal(logits, twin_logits)  # the forward is the same operations on the same values
    relative = float((grad - twin_grad).abs().max() / grad.abs().max())
    assert 0 < relative < 1e-5  # differs by rounding only (the scale sits on the weight)
    assert input_gradient_copy(net, x) is twin  # cached per module, shape and weight version


def test_hooked_or_batchnorm_free_networks_are_used_as_they_are() -> None:
    vgg = load_model("vgg16", weights="random", seed=0).module
    x = torch.rand(1, 3, 224, 224)
    assert input_gradient_copy(vgg, x) is vgg  # no BatchNorm: nothing to merge, no copy
    lite = load_model("efficientnet_lite0", weights="random", seed=0).module
    handle = lite.features[1].register_forward_hook(lambda *_: None)
    try:
        assert input_gradient_copy(lite, x) is lite  # a hook sees what it was written for
    finally:
        handle.remove()


def test_no_graph_wanted_runs_the_plain_pair() -> None:
    lite = load_model("efficientnet_lite0", weights="random", seed=0).module.eval()
    x = torch.rand(1, 3, 224, 224)
    twin = input_gradient_copy(lite, x)
    with torch.no_grad():
        assert torch.equal(twin(x), lite(x))
