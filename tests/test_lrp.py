"""Layer-wise relevance propagation (``convscope.lrp``, ``probes/lrp_rules.py``).

* equal to zennit, composite by composite with the matching canonizers, on real photos and
  real-size networks (seeded VGG16, AlexNet, ResNet-18; the pretrained default model);
* conservation: with epsilon = 0 and no bias the input relevance adds up to the explained logit,
  and so does the relevance at an intermediate layer (the contract CRP builds on);
* the model is left exactly as found (hooks, parameters), also after an exception;
* layers no rule covers are named; torchvision CNNs work; the ``convscope lrp`` command.

The zennit side: zennit's ``SequentialMergeBatchNorm`` leaves each emptied BatchNorm computing
``x / sqrt(1 + eps)`` instead of ``x`` (it resets the statistics but keeps ``eps``), which moves
its forward values by ``eps / 2`` per BatchNorm (5e-4 with EfficientNet's eps = 1e-3, 49 times).
The peer runs here with that identity made exact (``ExactMerge``: eps is 0 while merged), so both
sides compute the same network; everything else (rules, composites, ResNet's ``Sum``) is
zennit's own. EfficientNet-Lite's residual additions get zennit's ``Sum`` the way zennit's
``ResNetCanonizer`` gives them to ResNet blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import recalibrated
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import convscope
from convscope.errors import BadArgument
from convscope.methods._common import prepare
from convscope.methods.lrp import lrp
from convscope.models.load import load_model
from convscope.probes.hooks import capture
from convscope.probes.lrp_rules import COMPOSITES, box_bounds, lrp_rules

pytest.importorskip("zennit")
from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer

DATA = Path(convscope.__file__).parent / "data"


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(DATA / name).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg")]


class ExactMerge(SequentialMergeBatchNorm):
    """zennit's BatchNorm merge, the emptied BatchNorm an exact identity (eps 0 while merged)."""

    def register(self, linears, batch_norm):  # type: ignore[no-untyped-def]
        super().register(linears, batch_norm)
        self.saved_eps, batch_norm.eps = batch_norm.eps, 0.0

    def remove(self):  # type: ignore[no-untyped-def]
        super().remove()
        self.batch_norm.eps = self.saved_eps


def _mbconv_forward(self, x):  # type: ignore[no-untyped-def]
    out = x if self.expand is None else self.expand(x)
    out = self.project(self.depthwise(out))
    if self.use_residual:
        out = self.canonizer_sum(torch.stack([out, x], dim=-1))
    return out


def _mbconv_sum(name, module):  # type: ignore[no-untyped-def]
    from convscope.models.nets.efficientnet_lite import MBConv

    if isinstance(module, MBConv):
        return {"forward": _mbconv_forward.__get__(module), "canonizer_sum": Sum()}
    return None


def zennit_lrp(module: nn.Module, batch: torch.Tensor, targets: torch.Tensor, composite: str,
               canonizers: list, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    made = {
        "epsilon-plus-flat": lambda: EpsilonPlusFlat(canonizers=canonizers),
        "epsilon-gamma-box": lambda: EpsilonGammaBox(low=low.to(batch), high=high.to(batch), canonizers=canonizers),
        "epsilon-alpha2-beta1": lambda: EpsilonAlpha2Beta1(canonizers=canonizers),
    }[composite]()
    x = batch.detach().clone().requires_grad_(True)
    with made.context(module) as hooked:
        logits = hooked(x)
        seed = torch.zeros_like(logits).scatter_(1, targets[:, None], logits.gather(1, targets[:, None]))
        (relevance,) = torch.autograd.grad(logits, x, seed)
    return relevance


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).abs().max() / theirs.abs().max())


def compare(loaded, photos, composites, canonizers, dtype=torch.float32) -> None:  # type: ignore[no-untyped-def]
    _, batch = prepare(loaded, photos)
    loaded.module.to(dtype)
    batch = batch.to(dtype)
    low, high = box_bounds(loaded.preprocess.mean, loaded.preprocess.std)
    for composite in composites:
        ours = lrp(loaded, batch, composite=composite)
        theirs = zennit_lrp(loaded.module, batch, ours.targets, composite, canonizers, low, high)
        assert ours.attributions.shape == batch.shape
        assert theirs.abs().max() > 0
        assert relative(ours.attributions, theirs) < 1e-4, composite
        assert ours.uncovered == () and ours.warnings == ()


@pytest.mark.peer
@pytest.mark.parametrize("composite", COMPOSITES)
def test_alexnet_equals_zennit(composite: str, photos: list[Image.Image]) -> None:
    compare(load_model("alexnet", weights="random"), photos, [composite], [])


@pytest.mark.peer
@pytest.mark.slow
def test_vgg16_equals_zennit(photos: list[Image.Image]) -> None:
    compare(load_model("vgg16", weights="random"), photos, ["epsilon-gamma-box", "epsilon-plus-flat"], [])


@pytest.mark.peer
@pytest.mark.slow
def test_resnet18_equals_zennit(photos: list[Image.Image]) -> None:
    """In float64: a random ResNet's residual sums nearly cancel in places, so the sum rule's
    ``a / (a + b)`` turns float32 rounding of the forward values into 1e-4 differences."""
    loaded = load_model("resnet18", weights="random")
    recalibrated(loaded.module, prepare(loaded, photos)[1])
    compare(loaded, photos, ["epsilon-plus-flat", "epsilon-gamma-box"],
            [ExactMerge(), ResNetBasicBlockCanonizer()], dtype=torch.float64)


@pytest.mark.peer
@pytest.mark.slow
def test_default_model_equals_zennit(default_model, photos: list[Image.Image]) -> None:  # type: ignore[no-untyped-def]
    compare(default_model, photos, ["epsilon-plus-flat", "epsilon-gamma-box"],
            [ExactMerge(), AttributeCanonizer(_mbconv_sum)])


def _without_bias(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for sub in module.modules():
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
            if isinstance(sub, nn.BatchNorm2d):
                sub.running_mean.zero_()  # the merged bias (b - mean) * scale + beta is then 0
    return module


@pytest.mark.parametrize(("name", "composite"), [("alexnet", "epsilon-plus-flat"), ("resnet18", "epsilon-alpha2-beta1")])
def test_relevance_is_conserved_without_bias(name: str, composite: str, photos: list[Image.Image]) -> None:
    """AlexNet: flat, z-plus, max pools, epsilon; ResNet-18 adds merged BatchNorms and the
    residual sums."""
    loaded = load_model(name, weights="random")
    _, batch = prepare(loaded, photos)
    if name == "resnet18":
        recalibrated(loaded.module, batch)
    _without_bias(loaded.module)
    result = lrp(loaded, batch, composite=composite, epsilon=0.0)
    sums = result.attributions.double().sum(dim=(1, 2, 3))
    assert torch.allclose(sums, result.scores.double(), rtol=1e-4, atol=0), (sums, result.scores)


def test_intermediate_relevance_and_masked_channels_are_conserved(photos: list[Image.Image]) -> None:
    """The CRP contract: the gradient at a module output kept by ``capture(mode="graph")`` is that
    output's relevance (it sums to the logit without biases); masked to one channel and carried
    on to the input, it gives that channel's share, which also adds up."""
    loaded = load_model("alexnet", weights="random")
    module = _without_bias(loaded.module.eval())
    _, batch = prepare(loaded, photos)
    x = batch.clone().requires_grad_(True)
    layer = module.features[8]  # conv4
    with lrp_rules(module, epsilon=0.0), capture(module, {"conv4": layer}, mode="graph") as kept:
        logits = module(x)
        target = logits.argmax(1)
        seed = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
        at_layer, at_input = torch.autograd.grad(logits, (kept.last("conv4"), x), seed, retain_graph=True)
        explained = logits.gather(1, target[:, None])[:, 0].detach()
        assert torch.allclose(at_layer.sum(dim=(1, 2, 3)), explained, rtol=1e-4, atol=0)
        assert torch.allclose(at_input.sum(dim=(1, 2, 3)), explained, rtol=1e-4, atol=0)
        channel = int(at_layer[0].sum(dim=(1, 2)).abs().argmax())
        mask = torch.zeros_like(at_layer)
        mask[:, channel] = 1
        (conditional,) = torch.autograd.grad(kept.last("conv4"), x, at_layer * mask)
    share = at_layer[:, channel].sum(dim=(1, 2))
    assert share.abs().min() > 0
    assert torch.allclose(conditional.sum(dim=(1, 2, 3)), share, rtol=1e-4, atol=1e-6 * float(explained.abs().max()))


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


class Boom(RuntimeError):
    pass


def test_forward_unchanged_and_model_restored_even_after_an_exception() -> None:
    loaded = load_model("resnet18", weights="random")
    module = loaded.module.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = module(x)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hooks = _hook_count(module)
    with pytest.raises(Boom), lrp_rules(module, "epsilon-gamma-box", low=-2.0, high=2.5) as state:
        out = module(x.clone().requires_grad_(True))
        assert torch.equal(out, plain)  # the forward pass is the model's own, bit for bit
        assert len(state.merged) == 20 and state.residual_sums == 8
        raise Boom

    def explode(*_):  # type: ignore[no-untyped-def]
        raise Boom

    handle = module.layer3.register_forward_hook(explode)
    with pytest.raises(Boom), lrp_rules(module):
        module(x.clone().requires_grad_(True))
    handle.remove()
    assert _hook_count(module) == hooks
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(leaf)[:, 1].sum(), leaf)
    reference = load_model("resnet18", weights="random").module.eval()
    leaf2 = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(leaf2)[:, 1].sum(), leaf2)
    assert torch.equal(grad, expected)  # plain gradients again


class Gated(nn.Module):
    """A squeeze-excitation-like gate: a product of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.squeeze(x.mean((2, 3))))[:, :, None, None]


def test_layers_without_a_rule_are_named_not_fatal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), Gated(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    result = lrp(model.eval(), torch.randn(2, 3, 16, 16))
    assert result.uncovered == ("1", "3")
    assert len(result.warnings) == 1 and "2 layers (1, 3)" in result.warnings[0]
    assert torch.isfinite(result.attributions).all() and result.attributions.abs().sum() > 0


def test_torchvision_resnet_is_canonized() -> None:
    loaded = load_model("torchvision:resnet18", weights="random")
    x = torch.randn(1, 3, 64, 64)
    with lrp_rules(loaded.module.eval()) as state:
        loaded.module(x.requires_grad_(True))
    assert len(state.merged) == 20 and state.residual_sums == 8 and state.uncovered == ()


@pytest.mark.parametrize(("name", "composite"), [
    ("tiny", "epsilon-alpha2-beta1"), ("zfnet_mnist", "epsilon-gamma-box"), ("alexnet_cifar", "epsilon-plus-flat"),
])
def test_small_builtin_models_run(name: str, composite: str) -> None:
    """The big built-ins are the peer comparisons above."""
    loaded = load_model(name, weights="random")
    batch = torch.randn(2, *loaded.preprocess.input_size)
    result = lrp(loaded, batch, composite=composite)
    assert result.attributions.shape == batch.shape and torch.isfinite(result.attributions).all()
    assert result.attributions.abs().sum() > 0
    assert result.maps.shape == (2, *batch.shape[2:]) and result.uncovered == ()
    assert result.settings["composite"] == composite


@pytest.mark.parametrize(("options", "subject"), [
    ({"composite": "epsilon"}, "composite"), ({"epsilon": -1.0}, "epsilon"), ({"gamma": float("nan")}, "gamma"),
])
def test_bad_arguments_name_the_parameter(options: dict, subject: str) -> None:
    with pytest.raises(BadArgument) as error:
        lrp(load_model("tiny", weights="random"), torch.zeros(1, 3, 32, 32), **options)
    assert error.value.subject == subject


def test_cli_writes_png_and_json(tmp_path: Path) -> None:
    import json

    from convscope.cli.main import app

    result = CliRunner().invoke(app, ["lrp", str(DATA / "chelsea.jpg"), "--model", "tiny", "--weights", "random",
                                      "--composite", "epsilon-gamma-box", "--gamma", "0.5", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "chelsea_lrp.png").stat().st_size > 0
    (record,) = json.loads((tmp_path / "lrp.json").read_text())
    assert record["settings"]["composite"] == "epsilon-gamma-box" and record["settings"]["gamma"] == 0.5
    assert record["settings"]["low"] == [-2.0] * 3 and record["settings"]["high"] == [2.0] * 3
    assert record["uncovered"] == []
