"""Findings on models outside the registry (issue 18): the report survives a method that cannot
run, ``to_image(photo)`` draws on the crop the model saw, and cascading randomisation
re-initialises the parameterised layers of a wrapped network."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torchvision
from torch import nn

import convscope
from convscope.analysis.quality import quality
from convscope.explore import explore
from convscope.methods.guided import guided_backprop
from convscope.methods.registry import get_method
from convscope.render.pictures import display_image
from convscope.render.views import render


def _silu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_the_report_survives_a_network_without_relu() -> None:
    loaded = convscope.wrap_model(_silu_net(), categories=[f"c{i}" for i in range(5)])
    report = explore(loaded, torch.randn(1, 3, 224, 224))
    deconv = next(s for s in report.sections if s.key == "deconv")
    assert deconv.views and deconv.notes == []  # it ran: plain gradients, and said so
    assert any(w.startswith("deconvnet (") and "no rectifier" in w for w in report.warnings)
    assert any(w.startswith("guided backprop (2 SiLU without a rule)") for w in report.warnings)


def test_a_refused_layer_drops_out_with_a_note() -> None:
    loaded = convscope.wrap_model(_silu_net(), categories=[f"c{i}" for i in range(5)])
    # A stage that is not a feature map: feature maps and deconvnet refuse it.
    refused = dataclasses.replace(loaded, stages={**loaded.stages, "head": "6"})
    report = explore(refused, torch.randn(1, 3, 224, 224))
    keys = [s.key for s in report.sections]
    assert keys[:3] == ["classify", "summary", "activations"] and "saliency" in keys
    features = next(s for s in report.sections if s.key == "features")
    assert features.views and len(features.notes) == 1
    assert features.notes[0].startswith(
        "Feature maps at head left out of the report: head: has output shape (1, 5), not a (N, C, H, W) feature map")
    assert features.notes[0] in report.warnings
    from convscope.render.report import report_html

    page = report_html(report)
    assert f'<p class="note">note: {features.notes[0]}' in page.replace("&#39;", "'")
    saliency = next(s for s in report.sections if s.key == "saliency")
    assert saliency.views and not saliency.notes


def test_to_image_without_model_draws_on_the_crop_the_model_saw(photo) -> None:  # type: ignore[no-untyped-def]
    loaded = convscope.load_model("tiny", weights="random")
    result = guided_backprop(loaded, photo)
    spec = get_method("guided")
    alone = render(spec, result, photo).get("magnitude").picture
    with_model = render(spec, result, photo, model=loaded).get("magnitude").picture
    assert np.array_equal(alone, with_model)
    crop = display_image(loaded.preprocess, loaded.preprocess.to_tensor(photo), 0)
    assert alone.shape[:2] == crop.shape[:2]
    # The uncropped photo squeezed to the input size is a different picture under the map.
    squeezed = np.asarray(photo.resize((crop.shape[1], crop.shape[0])))
    assert np.abs(crop.astype(int) - squeezed.astype(int)).mean() > 10


def test_randomisation_reinitialises_the_convolutions_of_a_wrapped_resnet() -> None:
    torch.manual_seed(0)
    loaded = convscope.wrap_model(torchvision.models.resnet18())
    original = {n: p.detach().clone() for n, p in loaded.module.named_parameters()}
    seen: list[dict[str, torch.Tensor]] = []

    def weights_map(twin, batch, targets, layer, seed):  # type: ignore[no-untyped-def]
        seen.append({n: p.detach().clone() for n, p in twin.module.named_parameters()})
        return batch.abs().mean(dim=1)

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cascade = quality(loaded, x, weights_map, ("randomization",)).randomization
    assert cascade is not None
    steps = dict(zip(cascade.layers, cascade.modules, strict=True))
    assert cascade.layers[0] == "fc" and steps["fc"] == ("fc",)
    assert steps[cascade.layers[-1]] == ("conv1", "bn1")  # the stem stage is its ReLU: its conv and norm
    assert all(modules for modules in cascade.modules) and cascade.kept == ()
    changed = lambda step, name: not torch.equal(seen[step][name], original[name])
    # seen[0] is the method's own map on the caller's model; then one per cascade step.
    assert not changed(0, "conv1.weight") and changed(1, "fc.weight") and not changed(1, "layer4.1.conv2.weight")
    assert changed(2, "layer4.1.conv2.weight") and not changed(2, "layer3.1.conv2.weight")
    final = seen[-1]
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer2.1.conv2.weight", "layer4.0.downsample.0.weight"):
        assert not torch.equal(final[name], original[name]), name
    for name, value in loaded.module.named_parameters():  # the caller's model is untouched
        assert torch.equal(value, original[name])
