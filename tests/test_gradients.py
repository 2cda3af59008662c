"""Gradient methods: rectifier rules, deconvnet, guided backprop, saliency, Grad-CAM(++).

Exact values on hand-built models, an explicit Zeiler & Fergus deconvnet on AlexNet, batching,
errors, and the model left as found. Peer comparisons are in ``test_peers_gradients.py``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope
from convscope.errors import BadArgument, BadTarget, UnknownLayer
from convscope.methods.deconvnet import deconv
from convscope.methods.gradcam import gradcam, gradcam_plus_plus, guided_gradcam
from convscope.methods.guided import guided_backprop, saliency
from convscope.methods.targets import resolve_label, resolve_targets
from convscope.models.load import load_model, wrap_model
from convscope.probes.geometry import cell_box, layer_geometry
from convscope.probes.relu_rules import relu_rule


def grad_state() -> tuple[bool, int]:
    return torch.is_grad_enabled(), torch._C._len_torch_function_stack()


@pytest.fixture
def untouched(assert_no_side_effects):  # type: ignore[no-untyped-def]
    """conftest's check plus global state (grad mode, torch-function modes) and model outputs."""

    def check(model: nn.Module, fn: Any, probe: torch.Tensor | None = None) -> Any:
        before_global = grad_state()
        with torch.no_grad():
            before_out = model.eval()(probe) if probe is not None else None
        try:
            return assert_no_side_effects(model, fn)
        finally:
            assert grad_state() == before_global
            if probe is not None:
                with torch.no_grad():
                    assert torch.equal(model.eval()(probe), before_out)

    return check


# ---------------------------------------------------------------- rectifier rules

X = torch.tensor([-1.0, 0.5, 2.0, 7.0])
G = torch.tensor([1.0, -1.0, 1.0, 1.0])


def rule_gradient(activation: nn.Module | Any, rule: str, active: bool = True) -> torch.Tensor:
    x = X.clone().requires_grad_(True)
    with relu_rule(nn.Identity(), rule) as state:
        y = activation(x * 1.0)
    state.active = active
    (g,) = torch.autograd.grad(y, x, G)
    return g


@pytest.mark.parametrize(
    ("activation", "rule", "expected"),
    [
        # deconvnet ReLU: relu(g), whatever the forward input.
        (nn.ReLU(), "deconvnet", [1.0, 0.0, 1.0, 1.0]),
        # guided ReLU: relu(g * [x > 0]).
        (nn.ReLU(), "guided", [0.0, 0.0, 1.0, 1.0]),
        # ReLU6 = ReLU then clip at 6: the clip keeps its ordinary gradient ([x < 6]).
        (nn.ReLU6(), "deconvnet", [1.0, 0.0, 1.0, 0.0]),
        (nn.ReLU6(), "guided", [0.0, 0.0, 1.0, 0.0]),
        (nn.ReLU(inplace=True), "guided", [0.0, 0.0, 1.0, 1.0]),
        (F.relu, "deconvnet", [1.0, 0.0, 1.0, 1.0]),
        (torch.relu, "guided", [0.0, 0.0, 1.0, 1.0]),
        (lambda t: t.relu_(), "guided", [0.0, 0.0, 1.0, 1.0]),
        (lambda t: F.relu(t, inplace=True), "deconvnet", [1.0, 0.0, 1.0, 1.0]),
        (F.relu6, "guided", [0.0, 0.0, 1.0, 0.0]),
        (lambda t: F.hardtanh(t, 0.0, 3.0), "deconvnet", [1.0, 0.0, 1.0, 0.0]),
    ],
)
def test_rule_backward_values(activation: Any, rule: str, expected: list[float]) -> None:
    assert rule_gradient(activation, rule).tolist() == expected


def test_rule_switched_off_gives_plain_gradient() -> None:
    assert rule_gradient(nn.ReLU(), "guided", active=False).tolist() == [0.0, -1.0, 1.0, 1.0]
    assert rule_gradient(nn.ReLU6(), "deconvnet", active=False).tolist() == [0.0, -1.0, 1.0, 0.0]


def test_rule_forward_is_exact_and_inplace_stays_inplace() -> None:
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    h = x * 2.0
    with relu_rule(nn.Identity(), "guided") as state:
        out = F.relu(h, inplace=True)
        clipped = F.relu6(x * 4.0)
    assert out is h  # callers that ignore the return value of an in-place op still work
    assert torch.equal(out, torch.relu(x.detach() * 2.0))
    assert torch.equal(clipped, F.relu6(x.detach() * 4.0))
    assert dict(state.rectifiers) == {"ReLU": 1, "ReLU6": 1}
    assert state.warnings() == ()


def test_rule_counts_activations_without_rule() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Conv2d(2, 2, 1), nn.SiLU(), nn.GELU(), nn.ReLU())
    x = torch.randn(1, 1, 6, 6, requires_grad=True)
    with relu_rule(model, "guided") as state:
        model(x)
    assert state.warnings() == (
        "guided rule not applied to 1 GELU activation (no such rule for them; plain gradients pass through)",
        "guided rule not applied to 2 SiLU activations (no such rule for them; plain gradients pass through)",
    )


def test_rule_rejects_unknown_rule() -> None:
    with pytest.raises(ValueError, match="rule must be one of"), relu_rule(nn.Identity(), "lrp"):
        pass


def test_rule_leaves_no_mode_behind_on_error() -> None:
    before = torch._C._len_torch_function_stack()
    with pytest.raises(RuntimeError, match="boom"), relu_rule(nn.Identity(), "guided"):
        raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == before
    assert torch.relu(torch.tensor([-1.0])).grad_fn is None


class FunctionalNet(nn.Module):
    """TinyCNN's maths with functional relu calls instead of modules."""

    def __init__(self, modules_net: nn.Module) -> None:
        super().__init__()
        self.net = modules_net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = F.relu(net.conv1(x))
        x = net.pool(torch.relu(net.conv2(x)))
        return net.fc(torch.flatten(x, 1))


def reference_guided(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Guided backprop with an explicit rule per call, written independently of relu_rules."""

    class GuidedReLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(t)
            return t.clamp(min=0)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (t,) = ctx.saved_tensors
            return torch.where((t > 0) & (g > 0), g, torch.zeros_like(g))

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = GuidedReLU.apply(model.conv1(x))
        h = model.pool(GuidedReLU.apply(model.conv2(h)))
        return model.fc(torch.flatten(h, 1))

    x = x.clone().requires_grad_(True)
    out = forward(x)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return g


def test_guided_backprop_reused_inplace_relu_and_functional_relu(tiny_cnn, untouched) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = untouched(tiny_cnn, lambda: guided_backprop(tiny_cnn, x), probe=x)
    expected = reference_guided(tiny_cnn, x, result.targets)
    torch.testing.assert_close(result.attributions, expected, rtol=0, atol=1e-7)
    assert result.warnings == ()
    # The same maths with F.relu/torch.relu gets the rule too.
    functional = guided_backprop(FunctionalNet(tiny_cnn), x, target=result.targets)
    torch.testing.assert_close(functional.attributions, expected, rtol=0, atol=1e-7)
    # ...which differs from the plain gradient.
    plain = saliency(tiny_cnn, x, target=result.targets)
    assert not torch.allclose(plain.attributions, expected)


def test_guided_backprop_warns_on_silu_network() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    x = torch.randn(2, 3, 8, 8)
    result = guided_backprop(model, x)
    assert result.warnings == ("guided backprop (2 SiLU without a rule): no rectifier: this map equals the saliency map",)
    assert result.rules is not None and not result.rules.applied
    # Nothing to apply a rule to: the numbers are the plain gradient, and the warning says so.
    torch.testing.assert_close(result.attributions, saliency(model, x, target=result.targets).attributions)
    # Deconv says the same instead of refusing (the report keeps its page on such networks).
    projected = deconv(model, x, "1", channel=0)
    assert projected.rules is not None and not projected.rules.applied
    assert len(projected.warnings) == 1 and "no rectifier" in projected.warnings[0]


# ---------------------------------------------------------------- saliency / guided shapes


def test_saliency_is_abs_max_over_channels_of_the_gradient(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    result = saliency(tiny_cnn, x, target=[1, 4])
    leaf = x.clone().requires_grad_(True)
    out = tiny_cnn.eval()(leaf)
    (g,) = torch.autograd.grad(out[0, 1] + out[1, 4], leaf)
    assert result.attributions.dtype == torch.float32 and result.maps.shape == (2, 16, 16)
    torch.testing.assert_close(result.attributions, g)
    torch.testing.assert_close(result.maps, g.abs().amax(dim=1))
    assert result.targets.tolist() == [1, 4]
    torch.testing.assert_close(result.scores, torch.stack([out[0, 1], out[1, 4]]).detach())


def test_input_tensor_is_not_marked(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(1, 3, 16, 16)
    guided_backprop(tiny_cnn, x)
    assert not x.requires_grad and x.grad is None


# ---------------------------------------------------------------- Grad-CAM golden values


class TwoChannel(nn.Module):
    """Layer ``conv`` is the identity on 2 channels; the score of class k is sum_c w_kc * mean(A_c)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


TWO_INPUT = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]])


def test_gradcam_hand_computed() -> None:
    model = wrap_model(TwoChannel(), categories=["up", "down"])
    result = gradcam(model, TWO_INPUT, target="up", layer="conv")
    # d score / d A_c = w_c / 4 -> weights (0.25, -0.25); relu(x0/4 - x1/4) = (0, .5, .75, 1).
    torch.testing.assert_close(result.weights, torch.tensor([[0.25, -0.25]]))
    torch.testing.assert_close(result.raw, torch.tensor([[[0.0, 0.5], [0.75, 1.0]]]))
    torch.testing.assert_close(result.maps, torch.tensor([[[0.0, 0.5], [0.75, 1.0]]]))
    assert result.labels == ("up",) and result.targets.tolist() == [0]
    torch.testing.assert_close(result.scores, torch.tensor([(10.0 - 4.0) / 4]))


def test_gradcam_plus_plus_hand_computed() -> None:
    result = gradcam_plus_plus(TwoChannel(), TWO_INPUT, target=0, layer="conv")
    # g = 0.25 everywhere in channel 0: alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6), sum(A) = 10;
    # weight = 4 cells * g * alpha. Channel 1 has g = -0.25: relu(g) = 0.
    alpha = 0.0625 / (0.125 + 10 * 0.015625 + 1e-6)
    torch.testing.assert_close(result.weights, torch.tensor([[4 * 0.25 * alpha, 0.0]]))
    torch.testing.assert_close(result.maps, torch.tensor([[[0.0, 1 / 3], [2 / 3, 1.0]]]))


def test_gradcam_upsamples_bilinear_half_pixel(tiny_handset) -> None:  # type: ignore[no-untyped-def]
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_handset

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).sum(dim=(2, 3))

    x = torch.arange(36.0).view(1, 1, 6, 6) / 10
    result = gradcam(Head(), x, target=0, layer="body.relu")
    assert result.raw.shape == (1, 4, 4) and result.maps.shape == (1, 6, 6)
    up = F.interpolate(result.raw[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
    expected = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(result.maps, expected)


# ---------------------------------------------------------------- batching, devices, dtypes


def test_gradcam_batch_equals_single_images(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    batch = gradcam(tiny_cnn, x, target=[0, 2, 4], layer="conv2")
    for i, t in enumerate([0, 2, 4]):
        one = gradcam(tiny_cnn, x[i : i + 1], target=t, layer="conv2")
        torch.testing.assert_close(batch.maps[i], one.maps[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch.weights[i], one.weights[0], rtol=1e-5, atol=1e-8)
    assert batch.maps.dtype == torch.float32 and batch.maps.device.type == "cpu"
    assert float(batch.maps.min()) == 0.0 and float(batch.maps.amax(dim=(1, 2)).min()) == 1.0


def test_methods_follow_model_dtype(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    single = guided_gradcam(tiny_cnn, x, layer="conv2")
    double = guided_gradcam(tiny_cnn.double(), x.double(), layer="conv2")
    assert double.attributions.dtype == torch.float32
    torch.testing.assert_close(double.attributions, single.attributions, rtol=1e-4, atol=1e-7)


def test_guided_gradcam_is_guided_times_gradcam(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    result = guided_gradcam(tiny_cnn, x, target=[1, 3], layer="conv2")
    cam = gradcam(tiny_cnn, x, target=[1, 3], layer="conv2")
    guided = guided_backprop(tiny_cnn, x, target=[1, 3])
    assert result.cam is not None
    torch.testing.assert_close(result.cam.maps, cam.maps)
    torch.testing.assert_close(result.attributions, guided.attributions * cam.maps[:, None])
    torch.testing.assert_close(result.maps, result.attributions.abs().amax(dim=1))


def test_user_module_with_training_flags_and_frozen_weights(tiny_cnn, untouched) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(tiny_cnn, nn.Dropout(0.5))
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    first = untouched(model, lambda: gradcam(model, x, layer="0.conv2"))
    assert all(m.training for m in model.modules())
    second = gradcam(model, x, layer="0.conv2")  # eval inside: dropout off, so deterministic
    torch.testing.assert_close(first.maps, second.maps)
    untouched(model, lambda: deconv(model, x, "0.conv2", channel=1))
    untouched(model, lambda: guided_gradcam(model, x, layer="0.conv2"))


# ---------------------------------------------------------------- targets and errors


def test_resolve_targets() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 0.0]])
    names = ("tabby, tabby cat", "tiger cat", "Persian cat")
    assert resolve_targets(None, logits, names).tolist() == [1, 0]
    assert resolve_targets(2, logits, names).tolist() == [2, 2]
    assert resolve_targets("persian CAT", logits, names).tolist() == [2, 2]
    assert resolve_targets(["tabby", 1], logits, names).tolist() == [0, 1]
    assert resolve_targets(torch.tensor([2, 0]), logits, names).tolist() == [2, 0]
    with pytest.raises(BadTarget, match=r"^--class 3: is out of range: m has 3 classes \(0..2\)$"):
        resolve_targets(3, logits, names, "m")
    with pytest.raises(BadTarget, match="did you mean: tiger cat"):
        resolve_targets("tigr cat", logits, names)
    with pytest.raises(BadTarget, match="gives 3 classes for 2 images"):
        resolve_targets([0, 1, 2], logits, names)
    with pytest.raises(BadTarget, match="matches 2 classes"):
        resolve_label("cat", ("cat, a", "cat, b"))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, x: gradcam(m, x, layer="fc"), UnknownLayer,
         r"^fc: has output shape \(1, 5\), not a \(N, C, H, W\) feature map"),
        (lambda m, x: gradcam(m, x, layer="conv9"), UnknownLayer, "no such layer"),
        (lambda m, x: gradcam(m, x, target=5), BadTarget, r"out of range: custom has 5 classes \(0..4\)"),
        (lambda m, x: guided_gradcam(m, x, target="class 7"), BadTarget, "is not a class of custom"),
        (lambda m, x: guided_backprop(m, x, target=-1), BadTarget, "out of range"),
        (lambda m, x: saliency(m, x, target=[1]), BadTarget, "gives 1 class for 2 images"),
        (lambda m, x: gradcam_plus_plus(m, x, layer="pool", target=9), BadTarget, "out of range"),
        (lambda m, x: deconv(m, x, "conv2", channel=4), BadArgument,
         r"^--channel 4: is out of range: layer conv2 has 4 channels \(0..3\)$"),
        (lambda m, x: deconv(m, x, "conv2", location="mean"), BadArgument, "must be 'max' or 'all'"),
        (lambda m, x: deconv(m, x, "conv2", top=0), BadArgument, "must be at least 1"),
        (lambda m, x: deconv(m, x, "fc", channel=0), UnknownLayer, "not a \\(N, C, H, W\\) feature map"),
    ],
)
def test_errors_are_one_line_and_leave_model_untouched(tiny_cnn, untouched, call, error, message) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(error, match=message) as info:
        untouched(tiny_cnn, lambda: call(tiny_cnn, x), probe=x)
    assert "\n" not in str(info.value)


def test_layer_that_does_not_reach_the_score() -> None:
    class Detour(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.unused = nn.Conv2d(3, 2, 3)
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused(x)
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    with pytest.raises(UnknownLayer, match="does not influence the class score"):
        gradcam(Detour(), torch.randn(1, 3, 8, 8), layer="unused")


def test_public_exports() -> None:
    for name in ("deconv", "guided_backprop", "saliency", "gradcam", "gradcampp", "guided_gradcam"):
        assert callable(getattr(convscope, name)) and name in convscope.__all__


# ---------------------------------------------------------------- deconvnet


def explicit_deconvnet(features: nn.Sequential, x: torch.Tensor, upto: int, seed: torch.Tensor) -> torch.Tensor:
    """Zeiler & Fergus' deconvnet written out for a conv/ReLU/max-pool stack: unpool with the
    forward switches, rectify, filter with the transposed kernels (no autograd)."""
    inputs, switches = [], {}
    h = x
    with torch.no_grad():
        for i in range(upto + 1):
            layer = features[i]
            inputs.append(h)
            if isinstance(layer, nn.MaxPool2d):
                h, switches[i] = F.max_pool2d(
                    h, layer.kernel_size, layer.stride, layer.padding, return_indices=True
                )
            else:
                h = layer(h.clone())
        signal = seed
        for i in range(upto, -1, -1):
            layer, before = features[i], inputs[i]
            if isinstance(layer, nn.ReLU):
                signal = signal.clamp(min=0)
            elif isinstance(layer, nn.MaxPool2d):
                # Overlapping pools (3x3 stride 2) can send two windows' values to one switch:
                # they add up.
                flat = torch.zeros_like(before).flatten(2)
                flat.scatter_add_(2, switches[i].flatten(2), signal.flatten(2))
                signal = flat.view_as(before)
            elif isinstance(layer, nn.Conv2d):
                stride, padding, kernel = layer.stride[0], layer.padding[0], layer.kernel_size[0]
                natural = (signal.shape[-1] - 1) * stride - 2 * padding + kernel
                signal = F.conv_transpose2d(
                    signal, layer.weight, stride=stride, padding=padding,
                    output_padding=before.shape[-1] - natural,
                )
            else:
                raise TypeError(f"unexpected layer {layer}")
    return signal


@pytest.fixture(scope="module")
def alexnet() -> Any:
    return load_model("alexnet", "random", seed=0, device="cpu")


@pytest.mark.parametrize(("layer", "index"), [("conv2", 4), ("conv5", 11), ("features.12", 12)])
def test_deconv_equals_explicit_unpool_rectify_transposed_conv(alexnet, photo, layer, index) -> None:  # type: ignore[no-untyped-def]
    x = alexnet.preprocess.to_tensor([photo, photo.transpose(0)])
    result = deconv(alexnet, x, layer, top=3, location="max")
    with torch.no_grad():
        activations = alexnet.module.features[: index + 1](x.clone())
    for n in range(2):
        for k in range(3):
            c = int(result.channels[n, k])
            r, col = result.positions[n, k].tolist()
            seed = torch.zeros_like(activations[n : n + 1])
            seed[0, c, r, col] = activations[n, c, r, col]
            expected = explicit_deconvnet(alexnet.module.features, x[n : n + 1], index, seed)[0]
            scale = expected.abs().max()
            assert scale > 0
            torch.testing.assert_close(result.projections[n, k] / scale, expected / scale, rtol=0, atol=1e-5)
    # location="all" is the whole feature map as the seed.
    c = int(result.channels[0, 0])
    whole = deconv(alexnet, x[:1], layer, channel=c, location="all")
    seed = torch.zeros_like(activations[:1])
    seed[0, c] = activations[0, c]
    expected = explicit_deconvnet(alexnet.module.features, x[:1], index, seed)[0]
    scale = expected.abs().max()
    torch.testing.assert_close(whole.projections[0, 0] / scale, expected / scale, rtol=0, atol=1e-5)


def test_deconv_picks_strongest_channels_and_their_boxes(alexnet, photo) -> None:  # type: ignore[no-untyped-def]
    x = alexnet.preprocess.to_tensor([photo])
    result = deconv(alexnet, x, "conv1", top=4)
    with torch.no_grad():
        act = alexnet.module.features[:2](x.clone())[0]  # (64, 55, 55)
    peaks = act.flatten(1).max(dim=1)
    order = peaks.values.argsort(descending=True)[:4]
    assert result.channels[0].tolist() == order.tolist()
    torch.testing.assert_close(result.values[0], peaks.values[order])
    assert result.grid == (55, 55) and result.projections.shape == (1, 4, 3, 224, 224)
    for k, c in enumerate(order.tolist()):
        row, col = divmod(int(peaks.indices[c]), 55)
        assert result.positions[0, k].tolist() == [row, col]
        # conv1: 11x11 stride 4 padding 2 -> field 11, jump 4, centre 3.5 + 4 * index.
        top, left = max(0, 4 * row - 2), max(0, 4 * col - 2)
        assert result.boxes[0, k].tolist() == [top, left, min(224, 4 * row + 9), min(224, 4 * col + 9)]
        # The projection lies inside that box and nowhere else.
        outside = result.projections[0, k].abs().clone()
        outside[:, top : 4 * row + 9, left : 4 * col + 9] = 0
        assert float(outside.max()) == 0.0 and float(result.projections[0, k].abs().max()) > 0
    assert result.boxes_exact and result.warnings == ()


def test_deconv_reports_progress_and_boxes_for_user_module(tiny_cnn, untouched) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    ticks: list[int] = []
    result = untouched(tiny_cnn, lambda: deconv(tiny_cnn, x, "pool", channel=[0, 2], progress=ticks.append), probe=x)
    assert ticks == [1, 1]
    assert result.channels.tolist() == [[0, 2], [0, 2]]
    geometry = layer_geometry(tiny_cnn, x[:1], "pool")
    for n in range(2):
        for k in range(2):
            r, c = result.positions[n, k].tolist()
            assert tuple(result.boxes[n, k].tolist()) == cell_box(geometry, r, c, (16, 16))
    assert math.isclose(geometry.size, 6.0)


def test_deconv_never_runs_the_classifier(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    class Exploding(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the classifier ran")

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(tiny_cnn.conv1, nn.ReLU(), tiny_cnn.conv2, nn.ReLU())
            self.head = Exploding()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    model = Staged()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    result = deconv(model, x, "features.3", channel=2, location="all")
    # Same projection as the same layers in a network that runs to the end.
    reference = deconv(nn.Sequential(*model.features, nn.Flatten()), x, "3", channel=2, location="all")
    torch.testing.assert_close(result.projections, reference.projections)
    assert float(result.projections.abs().max()) > 0


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> Any:
    from typer.testing import CliRunner

    import convscope.cli.explain  # noqa: F401  (registers the commands on the app)
    from convscope.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


TINY = ["--model", "tiny", "--weights", "random"]


def test_cli_gradcam_batch_continues_past_bad_files(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from conftest import skimage_photo

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    result = cli("gradcam", skimage_photo("chelsea.png"), bad, skimage_photo("coffee.png"), *TINY,
                 "--class", 3, "--variant", "guided", "-o", out, "--json")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: ") and "Traceback" not in result.output
    records = json.loads(result.stdout)
    assert [r["class"] for r in records] == [3, 3] and records[0]["layer"] == "conv2"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "chelsea_gradcam.png", "chelsea_gradcam_map.png", "chelsea_guided_gradcam.png",
        "coffee_gradcam.png", "coffee_gradcam_map.png", "coffee_guided_gradcam.png",
        "gradcam.json", "manifest.json",
    ])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gradcam", "--class", "1", "--label", "cat"], "error: --class/--label: give one of them, not both"),
        (["gradcam", "--class", "10"], "error: --class 10: is out of range: tiny has 10 classes (0..9)"),
        (["gradcam", "--layer", "classifier"], "error: classifier: has output shape (1, 10), not a (N, C, H, W)"),
        (["gradcam", "--variant", "score"], "error: --variant score: must be one of gradcam, gradcampp, guided"),
        (["saliency", "--label", "kitten"], "error: --label kitten: is not a class of tiny"),
        (["deconv"], "error: --layer: is required"),
        (["deconv", "--layer", "conv2", "--channel", "16"], "error: --channel 16: is out of range"),
        (["deconv", "--layer", "conv2", "--location", "mean"], "error: --location mean: must be 'max' or 'all'"),
    ],
)
def test_cli_errors_are_one_line_exit_2(cli, tmp_path, args, message) -> None:  # type: ignore[no-untyped-def]
    from conftest import skimage_photo

    result = cli(*args[:1], skimage_photo("chelsea.png"), *TINY, *args[1:], "-o", tmp_path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert "Traceback" not in result.output


def test_cli_deconv_writes_projections_crops_and_patches(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from conftest import skimage_photo
    from PIL import Image

    result = cli("deconv", skimage_photo("chelsea.png"), *TINY, "--layer", "conv1", "--top", 2, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    (record,) = json.loads((tmp_path / "deconv.json").read_text())
    assert len(record["projections"]) == 2
    for projection in record["projections"]:
        c = projection["channel"]
        top, left, bottom, right = projection["box"]
        assert (bottom - top, right - left) in {(3, 3), (2, 3), (3, 2), (2, 2)}  # 3x3 conv field, clipped
        assert min(Image.open(tmp_path / f"chelsea_conv1_ch{c}.png").size) >= 224  # captioned, enlarged
        assert projection["files"] == [f"chelsea_conv1_ch{c}.png", f"chelsea_conv1_ch{c}_crop.png"]
    assert (tmp_path / "chelsea_conv1_deconv.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_prints_method_warnings_once_each(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import skimage_photo

    photo = skimage_photo("chelsea.png")
    result = cli("deconv", photo, photo, "--layer", "stage3", "--top", 1, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: receptive field of stage3 passes residual or functional ops: crops follow the main path"
    ]


def test_deconv_warns_about_units_that_do_not_fire(tiny_handset) -> None:  # type: ignore[no-untyped-def]
    # HandSet's channel 1 has bias -1 on an all-ones kernel: on a zero image it never fires.
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = 0.5
    result = deconv(tiny_handset, x, "relu", channel=[0, 1])
    assert result.values.tolist() == [[0.5, 0.0]]
    assert result.warnings == (
        "relu channel 1: all zero in at least one image (the unit does not fire), so its projection there is empty",
    )
    assert float(result.projections[0, 1].abs().max()) == 0.0
    # channel 0 fires only at (0, 0): the projection is the all-ones kernel scaled by 0.5.
    expected = torch.zeros(1, 6, 6)
    expected[0, :3, :3] = 0.5
    torch.testing.assert_close(result.projections[0, 0], expected)


def test_target_accepts_numpy_integers_and_rejects_tuple_outputs(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    x = torch.randn(1, 3, 16, 16)
    assert gradcam(tiny_cnn, x, target=np.int64(2), layer="conv2").targets.tolist() == [2]

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_cnn

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.net(x)
            return out, out

    with pytest.raises(BadTarget, match=r"^custom: returns a tuple of 2 tensors \(pick the logits with --output-index N"):
        saliency(Pair(), x)
