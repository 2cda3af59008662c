"""Every registered model builds, its row is consistent, and its aliases resolve (timm-style walk)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.errors import UnknownLayer, UnknownModel
from convscope.models.load import load_model
from convscope.models.registry import get_spec, list_models
from convscope.probes.hooks import capture
from convscope.probes.layers import resolve_layer

EXPECTED = {
    "alexnet", "zfnet", "vgg16", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
    "efficientnet_lite2", "alexnet_mnist", "zfnet_mnist", "alexnet_cifar", "zfnet_cifar", "tiny",
}
HEAVY = {"vgg16", "resnet50"}  # forward at full size costs seconds; build-only for these


def test_registry_has_every_model() -> None:
    assert EXPECTED <= set(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_builds_and_is_consistent(name: str) -> None:
    spec = get_spec(name)
    loaded = load_model(name, weights="random", seed=0, device="cpu")
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == len(loaded.categories) == spec.num_classes
    modules = dict(loaded.module.named_modules())
    assert spec.first_conv in modules and isinstance(modules[spec.first_conv], nn.Conv2d)
    assert list(spec.stages)  # every model has named stages
    for alias, path in spec.stages.items():
        assert resolve_layer(loaded, alias)[0] == path
    if name in HEAVY:
        return
    x = torch.zeros((1, *spec.preprocess.input_size))
    stage_modules = {alias: modules[path] for alias, path in spec.stages.items()}
    with torch.no_grad(), capture(loaded.module, {**stage_modules, "cam": modules[spec.cam_layer]}) as store:
        logits = loaded.module(x)
    assert logits.shape == (1, spec.num_classes)
    assert store.last("cam").dim() == 4
    sizes = [store.last(alias).shape[-1] for alias in spec.stages]
    assert sizes == sorted(sizes, reverse=True), "stages run from fine to coarse"
    assert not loaded.module.training


def test_random_weights_are_seeded() -> None:
    a = load_model("tiny", weights="random", seed=3).module.state_dict()
    b = load_model("tiny", weights="random", seed=3).module.state_dict()
    c = load_model("tiny", weights="random", seed=4).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModel, match=r"alexnt: unknown model \(did you mean: alexnet"):
        get_spec("alexnt")


def test_unknown_layer_lists_valid_names() -> None:
    loaded = load_model("alexnet", weights="random")
    with pytest.raises(UnknownLayer, match=r"conv9: no such layer in alexnet.*conv1, conv2"):
        resolve_layer(loaded, "conv9")


def test_zfnet_matches_paper_sizes() -> None:
    loaded = load_model("zfnet", weights="random")
    f = loaded.module.features
    first, second = f[0], f[4]
    assert (first.out_channels, first.kernel_size, first.stride) == (96, (7, 7), (2, 2))
    assert (second.out_channels, second.kernel_size, second.stride) == (256, (5, 5), (2, 2))
    sizes = []
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for layer in f:
            x = layer(x)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                sizes.append(x.shape[-1])
    assert sizes == [110, 55, 26, 13, 13, 13, 13, 6]
