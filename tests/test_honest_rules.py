"""Deconvnet and guided backprop say where their rectifier rule went (issue 18, item 4).

On a network without rectifiers (EfficientNet-B0's SiLU) guided backprop is the saliency map bit
for bit and deconvnet projections are plain gradients: the result records it (``rules``), the JSON
record has a ``"rules"`` field, the title says so and the CLI prints one ``warning:`` line, where
deconvnet used to refuse. Random torchvision weights: these tests compare gradients with
gradients, not with trained behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import convscope
from convscope.explore import explain
from convscope.methods.deconvnet import deconv
from convscope.methods.guided import guided_backprop, saliency
from convscope.probes.relu_rules import relu_rule

NO_RECTIFIER = "guided backprop (49 SiLU without a rule): no rectifier: this map equals the saliency map"


@pytest.fixture(scope="module")
def efficientnet() -> convscope.LoadedModel:
    torch.manual_seed(0)
    return convscope.wrap_model(torchvision.models.efficientnet_b0())


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def test_guided_without_rectifiers_is_saliency_and_says_so(efficientnet, image) -> None:  # type: ignore[no-untyped-def]
    guided = guided_backprop(efficientnet, image)
    plain = saliency(efficientnet, image, target=guided.targets)
    assert torch.equal(guided.attributions, plain.attributions)
    assert guided.warnings == (NO_RECTIFIER,)
    rules = guided.rules
    assert rules is not None and not rules.applied and rules.rectifiers == ()
    record = rules.record()
    assert record["rule"] == "guided" and record["rectifiers"] == 0 and record["functional"] == []
    assert record["note"] == "no rectifier: this map equals the saliency map"
    assert len(record["without_rule"]) == 49 and record["without_rule"][0] == "features.0.2 (SiLU)"
    views = explain(efficientnet, image, "guided")
    assert views.record["rules"] == record and views.warnings == (NO_RECTIFIER,)
    assert views.get().title == "Guided backprop (no rectifier: plain gradient)"
    assert plain.rules is None and "rules" not in explain(efficientnet, image, "saliency").record


def test_deconv_without_rectifiers_projects_plain_gradients(efficientnet, image) -> None:  # type: ignore[no-untyped-def]
    result = deconv(efficientnet, image, "features.3", channel=[0, 5])
    assert result.rules is not None and not result.rules.applied
    assert result.warnings[0] == ("deconvnet (49 SiLU without a rule): no rectifier: these projections are the plain "
                                  "gradient of the activation")
    # The projection is the plain input gradient of the kept activation.
    module = efficientnet.module.get_submodule("features.3")
    x = image.clone().requires_grad_(True)
    kept: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.enable_grad():
        efficientnet.module.eval()(x)
    handle.remove()
    out = kept[0]
    y, z = (int(v) for v in result.positions[0, 1])
    (expected,) = torch.autograd.grad(out[0, 5, y, z] * result.values[0, 1], x)
    torch.testing.assert_close(result.projections[0, 1], expected[0], rtol=1e-4, atol=1e-7)
    views = explain(efficientnet, image, "deconv", layer="features.3", options={"channel": [0]})
    assert views.record["rules"]["note"].startswith("no rectifier") and views.get().title.endswith("(no rectifier: plain gradient)")


def test_a_mixed_network_names_the_sites_without_a_rule() -> None:
    torch.manual_seed(0)
    loaded = convscope.wrap_model(torchvision.models.mobilenet_v3_small())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    guided = guided_backprop(loaded, x)
    rules = guided.rules
    assert rules is not None and rules.applied
    assert "features.0.2 (Hardswish)" in rules.without_rule and "features.1.block.0.2 (ReLU)" in rules.rectifiers
    assert len(rules.without_rule) == 19 and all("Hardswish" in site for site in rules.without_rule)
    assert rules.note == "19 activations without a rule kept the plain gradient: a mix of the guided rule and plain gradients"
    assert guided.warnings == (f"guided backprop (19 Hardswish without a rule): {rules.note}",)
    assert not torch.equal(guided.attributions, saliency(loaded, x, target=guided.targets).attributions)


def test_functional_relus_get_the_rule_and_are_named_as_calls() -> None:
    # torchvision's DenseNet ends with F.relu in its own forward; its other ReLUs are modules.
    loaded = convscope.wrap_model(torchvision.models.densenet121())
    with relu_rule(loaded.module, "guided") as state, torch.enable_grad():
        loaded.module.eval()(torch.randn(1, 3, 64, 64, requires_grad=True))
    report = state.report()
    assert report.functional == ("model (ReLU, functional)",)
    assert "features.relu0 (ReLU)" in report.rectifiers and report.without_rule == () and report.note is None
    assert len(report.rectifiers) == 1 + 2 * 58 + 3 + 1  # relu0, 2 per dense layer, 3 transitions, the F.relu


def test_the_cli_prints_one_warning_and_records_the_rules(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from convscope.cli.main import app

    photo = Path(convscope.__file__).parent / "data" / "chelsea.jpg"
    result = CliRunner().invoke(app, ["guided", str(photo), "-m", "torchvision:efficientnet_b0", "-w", "random",
                                      "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: " + NO_RECTIFIER.replace("49 SiLU", "49 SiLU")]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json") if p.name != "manifest.json"]
    found = [r for r in records if "rules" in json.dumps(r)]
    assert found, records
