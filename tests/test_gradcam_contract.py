"""Grad-CAM, Grad-CAM++ and guided Grad-CAM on hand-made networks whose numbers are worked out by
hand: the Grad-CAM++ channel weights (including where its epsilon matters), the layer and method
each result names, non-square inputs, and every error the layer checks raise, word for word
(kills the mutmut survivors of ``methods/gradcam.py``: ``tools/mutate.py gradcam``).

The peer comparisons (``test_peers_gradients.py``) check the same methods on real models; these
run in the mutation runs' fast subset, where the peer tests are left out.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.errors import BadInputType, UnknownLayer
from convscope.methods.gradcam import gradcam, gradcam_plus_plus, guided_gradcam
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess


def _constant_net(head: list[list[float]]) -> nn.Module:
    """A 4x4 kernel turns a 4x4 image into one cell whose two channels are 2 and 4 whatever the
    image (zero weights, bias 2 and 4); the head's rows are the classes' weights on them. So the
    gradient of class c at the conv output is head[c], exactly."""
    conv = nn.Conv2d(3, 2, 4)
    linear = nn.Linear(2, len(head), bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([2.0, 4.0]))
        linear.weight.copy_(torch.tensor(head))
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear)


def _wrap(module: nn.Module):
    return wrap_model(module, preprocess=Preprocess(resize=None, crop=None), categories=["a", "b"])


def test_gradcam_plus_plus_channel_weights_by_hand() -> None:
    # alpha = g^2 / (2 g^2 + S g^3 + 1e-6), weight = relu(g) * alpha summed over the one cell.
    # channel 0: g = 1, S = 2: alpha = 1 / 4.000001          -> 0.24999994 (a gradient of exactly 1)
    # channel 1: g = 0.01, S = 4: alpha = 1e-4 / 2.05e-4      -> 0.01 * 0.48780488 = 0.0048780488
    # (the 1e-6 matters at this gradient: g^3 for g^2, or -1e-6, move it by 1 % or more)
    model = _wrap(_constant_net([[1.0, 0.01], [0.0, 1.0]]))
    x = torch.zeros(1, 3, 4, 4)
    plus = gradcam_plus_plus(model, x, target=0, layer="0")
    torch.testing.assert_close(plus.weights, torch.tensor([[1 / 4.000001, 0.01 * 1e-4 / 2.05e-4]]),
                               rtol=1e-6, atol=0)
    assert plus.method == "gradcampp" and plus.layer == "0"
    plain = gradcam(model, x, target=0, layer="0")
    torch.testing.assert_close(plain.weights, torch.tensor([[1.0, 0.01]]), rtol=1e-6, atol=0)
    assert plain.method == "gradcam" and plain.layer == "0"
    assert plain.warnings == () and plus.warnings == ()  # a tuple, empty: no rule was involved
    # the map: relu(0.25 * 2 + 0.004878 * 4) at the single cell, upsampled to 4x4, then scaled to [0, 1]
    torch.testing.assert_close(plus.raw, torch.tensor([[[2 / 4.000001 + 4 * 0.01 * 1e-4 / 2.05e-4]]]),
                               rtol=1e-6, atol=0)


class _Branchy(nn.Module):
    """Two conv stages (4 then 6 channels), plus layers that run but do not count, and one that
    never runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.never = nn.Conv2d(3, 3, 1)  # never called
        self.side = nn.Conv2d(3, 2, 3, padding=1)  # runs, but its output is thrown away
        self.frozen = nn.Identity()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.second = nn.Conv2d(4, 6, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)
        self.frozen(x.detach())
        features = self.act2(self.second(self.act1(self.first(x))))
        return self.head(self.pool(features).flatten(1))


@pytest.fixture(scope="module")
def branchy():
    return _wrap(_Branchy())


@pytest.mark.parametrize("method", [gradcam, gradcam_plus_plus, guided_gradcam])
def test_an_explicit_layer_is_the_one_used_and_non_square_inputs_keep_their_shape(branchy, method) -> None:
    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(1))
    result = method(branchy, x, layer="first")
    cam = result.cam if method is guided_gradcam else result
    assert cam.layer == "first" and cam.weights.shape == (2, 4)  # first's 4 channels, not second's 6
    assert cam.maps.shape == (2, 6, 10)
    if method is guided_gradcam:
        assert result.method == "guided_gradcam"
        assert result.attributions.shape == (2, 3, 6, 10) and result.maps.shape == (2, 6, 10)
    default = method(branchy, x)
    default_cam = default.cam if method is guided_gradcam else default
    # Wrapped without a crop size, it is measured on the batch: the last map before pooling.
    assert branchy.cam_layer == "" and default_cam.layer == "act2"
    assert default_cam.weights.shape == (2, 6)


def test_guided_gradcam_uses_the_plain_gradcam_at_its_layer(branchy) -> None:
    # The rectifier rule is off for the layer gradient: guided Grad-CAM's CAM is plain Grad-CAM.
    # (With the rule on, negative gradients through act2 would be dropped and the weights differ.)
    x = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(2))
    guided = guided_gradcam(branchy, x, target=[0, 1], layer="first")
    plain = gradcam(branchy, x, target=[0, 1], layer="first")
    torch.testing.assert_close(guided.cam.weights, plain.weights, rtol=0, atol=0)
    torch.testing.assert_close(guided.cam.maps, plain.maps, rtol=0, atol=0)
    assert guided.cam.method == "gradcam"


def test_guided_gradcam_reports_activations_without_a_rule() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    result = guided_gradcam(_wrap(net), torch.randn(1, 3, 8, 8), layer="2")
    assert result.warnings == (
        ("guided backprop (1 SiLU without a rule): 1 activation without a rule kept the plain gradient: "
        "a mix of the guided rule and plain gradients"),
    )
    assert result.rules is not None and result.rules.without_rule


LAYER_ERRORS = [
    ("never", ("never: did not run during the forward pass, or returned something other than a tensor "
               "(pick a layer the model calls (see 'convscope layers'))")),
    ("head", ("head: has output shape (1, 2), not a (N, C, H, W) feature map (layout vector 2) "
              "(pick a layer whose layout is NCHW, NHWC or tokens on a grid (see 'convscope layers'))")),
    ("frozen", "frozen: is not differentiable (its output is detached from the graph)"),
    ("side", "side: does not influence the class score (pick a layer before the classifier)"),
]


@pytest.mark.parametrize("method", [gradcam, gradcam_plus_plus, guided_gradcam])
@pytest.mark.parametrize(("layer", "message"), LAYER_ERRORS, ids=[e[0] for e in LAYER_ERRORS])
def test_layer_errors_word_for_word(branchy, method, layer: str, message: str) -> None:
    with pytest.raises(UnknownLayer) as caught:
        method(branchy, torch.randn(1, 3, 6, 6), layer=layer)
    assert str(caught.value) == message


@pytest.mark.parametrize("method", [gradcam, gradcam_plus_plus, guided_gradcam])
def test_no_default_layer_and_bad_target_kind(method) -> None:
    flat = _wrap(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)))
    with pytest.raises(UnknownLayer) as caught:
        method(flat, torch.randn(1, 3, 4, 4))
    assert str(caught.value) == "custom: has no default Grad-CAM layer (name one with layer=/--layer)"
    with pytest.raises(BadInputType) as bad:
        method(_wrap(_constant_net([[1.0, 0.0], [0.0, 1.0]])), torch.zeros(1, 3, 4, 4), target=0.5, layer="0")
    assert str(bad.value).startswith("target: expected ")
