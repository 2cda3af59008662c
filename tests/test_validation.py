"""Issue 8, item 7: every public function checks its image, tensor, target, layer and device
arguments up front, with one line naming the argument, what was expected and what was given."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope
from convscope.errors import BadArgument, BadInput, BadInputType, ConvscopeError
from convscope.models.load import load_model, resolve_device


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_model("tiny", "random", device="cpu")


@pytest.fixture(scope="module")
def good(tiny: Any) -> torch.Tensor:
    return tiny.preprocess.to_tensor(Image.new("RGB", (48, 40), (200, 30, 90)))


# Every public function that takes images, called the way a user would.
METHODS: dict[str, Callable[..., Any]] = {
    "classify": lambda m, x: convscope.classify(m, x),
    "activation_maps": lambda m, x: convscope.activation_maps(m, x),
    "feature_maps": lambda m, x: convscope.feature_maps(m, x, layer="conv2"),
    "gradcam": lambda m, x: convscope.gradcam(m, x),
    "gradcam_plus_plus": lambda m, x: convscope.gradcam_plus_plus(m, x),
    "guided_gradcam": lambda m, x: convscope.guided_gradcam(m, x),
    "guided_backprop": lambda m, x: convscope.guided_backprop(m, x),
    "saliency": lambda m, x: convscope.saliency(m, x),
    "deconv": lambda m, x: convscope.deconv(m, x, "conv2", channel=0),
    "occlusion": lambda m, x: convscope.occlusion(m, x, window=8, stride=8),
}
TARGET_METHODS = ("gradcam", "gradcam_plus_plus", "guided_gradcam", "guided_backprop", "saliency", "occlusion")


def _refused_kinds() -> dict[str, tuple[Any, str]]:
    """input -> (its description in the message, a word of the hint or '')."""
    return {
        "none": (None, "got None$"),
        "path_str": ("photos/cat.jpg", r"got str 'photos/cat\.jpg' \(methods take images, not files: .*load_image"),
        "path_obj": (Path("cat.jpg"), r"got PosixPath 'cat\.jpg' \(.*load_image"),
        "numpy": (np.zeros((32, 32, 3), np.uint8), r"got a numpy array of shape \(32, 32, 3\) and dtype uint8 \(.*fromarray"),
        "bytes": (b"\xff\xd8", r"got a bytes \(decode it first"),
        "int": (7, "got int 7$"),
    }


@pytest.mark.parametrize("kind", list(_refused_kinds()))
@pytest.mark.parametrize("method", list(METHODS))
def test_non_images_are_refused_by_kind(tiny: Any, method: str, kind: str, assert_no_side_effects: Any) -> None:
    value, given = _refused_kinds()[kind]
    pattern = r"^images: expected a PIL image, a list of them, or a normalised \(N, C, H, W\) float tensor, " + given
    with pytest.raises(BadInputType, match=pattern) as info:
        assert_no_side_effects(tiny.module, lambda: METHODS[method](tiny, value))
    # One class, three ways to catch it: ConvscopeError (CLI: one line, exit 2), TypeError (STYLE).
    assert isinstance(info.value, ConvscopeError) and isinstance(info.value, TypeError)
    assert "\n" not in str(info.value)


def _bad_values(good: torch.Tensor) -> dict[str, tuple[Any, type[Exception], str]]:
    nan = good.clone()
    nan[0, 1, 3, 4] = float("nan")
    inf = good.clone()
    inf[0, 0, :2, 0] = float("inf")
    return {
        "list_with_none": ([Image.new("RGB", (40, 40)), None], BadInputType, r"^images\[1\]: expected a PIL image, got None$"),
        "list_with_path": ([Image.new("RGB", (40, 40)), "b.jpg"], BadInputType, r"^images\[1\]: expected a PIL image, got str 'b\.jpg' \(decode files"),
        "list_with_tensor": ([good[0]], BadInputType, r"^images\[0\]: expected a PIL image, got a float32 tensor .*torch\.stack"),
        "empty_list": ([], BadInput, r"^images: empty list: give at least one image$"),
        "empty_batch": (good[:0], BadInput, r"^images: empty batch: shape \(0, 3, 32, 32\) holds no image$"),
        "rank_2": (good[0, 0], BadInput, r"^images: expected a \(N, C, H, W\) or \(C, H, W\) tensor, got shape \(32, 32\)$"),
        "one_channel": (good[:, :1], BadInput, r"^images: has 1 channel \(shape \(1, 1, 32, 32\)\), tiny takes 3 \(repeat the grey channel"),
        "four_channels": (torch.cat([good, good[:, :1]], 1), BadInput, r"^images: has 4 channels .*tiny takes 3 \(drop the alpha channel"),
        "too_small": (good[:, :, :8, :8], BadInput, r"^images: 8x8 pixels is too small for tiny: .*\(it takes 32x32; loaded\.preprocess\.to_tensor"),
        "nan": (nan, BadInput, r"^images: holds 1 NaN and 0 infinite values \(of 3072\); the network would return NaN scores"),
        "inf": (inf, BadInput, r"^images: holds 0 NaN and 2 infinite values \(of 3072\)"),
        "uint8": ((good * 50).to(torch.uint8), BadInputType, r"^images: expected a normalised floating-point tensor, got a uint8 tensor of shape \(1, 3, 32, 32\) \(for 0\.\.255 pixels use"),
        "int64": (good.long(), BadInputType, r"got a int64 tensor of shape"),
        "bool": (good > 0, BadInputType, r"got a bool tensor of shape"),
        "complex": (good.to(torch.complex64), BadInputType, r"^images: expected a normalised floating-point tensor, got a complex64 tensor of shape \(1, 3, 32, 32\)$"),
    }


@pytest.mark.parametrize("case", list(_bad_values(torch.zeros(1, 3, 32, 32))))
@pytest.mark.parametrize("method", list(METHODS))
def test_bad_image_values_are_refused_up_front(tiny: Any, good: torch.Tensor, method: str, case: str, assert_no_side_effects: Any) -> None:
    if case == "too_small" and method == "deconv":
        pytest.skip("deconv runs only up to its layer; covered by test_deconv_needs_only_its_layer_to_fit")
    value, error, pattern = _bad_values(good)[case]
    with pytest.raises(error, match=pattern) as info:
        assert_no_side_effects(tiny.module, lambda: METHODS[method](tiny, value))
    assert isinstance(info.value, ConvscopeError)
    assert isinstance(info.value, ValueError if error is BadInput else TypeError)


def test_nan_never_reaches_the_probabilities(tiny: Any, good: torch.Tensor) -> None:
    # Before: classify returned NaN probabilities without a word.
    nan = good.clone()
    nan[..., 0, 0] = float("nan")
    with pytest.raises(BadInput):
        convscope.classify(tiny, nan)
    assert torch.isfinite(convscope.classify(tiny, good)[0].probabilities).all()


def test_float64_input_that_overflows_float32_is_caught(tiny: Any, good: torch.Tensor) -> None:
    huge = good.double()
    huge[0, 0, 0, 0] = 1e300  # finite in float64, inf once cast to the model's float32
    with pytest.raises(BadInput, match="holds 0 NaN and 1 infinite value "):
        convscope.classify(tiny, huge)


@pytest.mark.parametrize("method", TARGET_METHODS)
@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (1.5, r"^target: expected None \(top-1\), a class index \(int\), a label \(str\), or one of those per image, got float 1\.5$"),
        (True, r"^target: expected .* got bool True$"),
        (torch.tensor([0.5]), r"^target: expected .* got a float32 tensor of shape \(1,\)$"),
        ([2, 1.5], r"^target\[1\]: expected a class index \(int\) or a label \(str\), got float 1\.5$"),
        ({"cat": 3}, r"^target: expected .* got a dict$"),
    ],
)
def test_bad_target_kinds(tiny: Any, good: torch.Tensor, method: str, target: Any, pattern: str) -> None:
    call = {
        "occlusion": lambda: convscope.occlusion(tiny, good, target, window=8, stride=8),
    }.get(method, lambda: getattr(convscope, method)(tiny, good, target))
    with pytest.raises(BadInputType, match=pattern):
        call()


@pytest.mark.parametrize("target", [3, np.int64(3), torch.tensor(3), [3], torch.tensor([3]), "cat", ["cat"]])
def test_good_target_kinds_still_work(tiny: Any, good: torch.Tensor, target: Any) -> None:
    assert convscope.gradcam(tiny, good, target).targets.tolist() == [3]  # cifar10: 3 is "cat"


def test_a_lone_layer_name_is_one_layer(tiny: Any, good: torch.Tensor) -> None:
    # Before: "conv1" was read as the layers "c", "o", "n"... ("c: no such layer").
    lone = convscope.activation_maps(tiny, good, layers="conv1")
    listed = convscope.activation_maps(tiny, good, layers=["conv1"])
    assert lone.layers == listed.layers == ("conv1",)
    torch.testing.assert_close(lone.maps["conv1"], listed.maps["conv1"])
    assert convscope.activation_maps(tiny, good, layers=("conv2", "conv1")).layers == ("conv2", "conv1")


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda m, x: convscope.activation_maps(m, x, layers=["conv1", 2]), r"^layers\[1\]: expected a layer name \(str\), got int 2"),
        (lambda m, x: convscope.activation_maps(m, x, layers=5), r"^layers: expected a layer name or a list of them, got int 5$"),
        (lambda m, x: convscope.feature_maps(m, x, layer=3), r"^layer: expected a layer name \(str\), got int 3 \(names are aliases"),
        (lambda m, x: convscope.gradcam(m, x, layer=["conv2"]), r"^layer: expected a layer name \(str\), got a list of 1 item"),
        (lambda m, x: convscope.conv_filters(m, layer=0.5), r"^layer: expected a layer name \(str\), got float 0\.5"),
    ],
)
def test_bad_layer_kinds(tiny: Any, good: torch.Tensor, call: Callable[..., Any], pattern: str) -> None:
    with pytest.raises(BadInputType, match=pattern):
        call(tiny, good)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda x: convscope.classify("alexnet", x), r"^model: expected a LoadedModel \(convscope\.load_model\) or an nn\.Module, got str 'alexnet' \(build it with convscope\.load_model\('alexnet'\)\)$"),
        (lambda x: convscope.gradcam(None, x), r"^model: expected .* got None$"),
        (lambda x: convscope.summary(np.zeros(3)), r"^model: expected .* got a numpy array"),
        (lambda x: convscope.conv_filters(42), r"^model: expected .* got int 42$"),
        (lambda x: convscope.wrap_model("resnet"), r"^module: expected a torch nn\.Module, got str 'resnet'$"),
        (lambda x: convscope.wrap_model(nn.Conv2d(3, 3, 1), preprocess=(256, 224)), r"^preprocess: expected a convscope\.Preprocess, got a tuple of 2 items$"),
    ],
)
def test_bad_models(good: torch.Tensor, call: Callable[..., Any], pattern: str) -> None:
    with pytest.raises(BadInputType, match=pattern):
        call(good)


def test_preprocess_to_tensor_names_the_bad_item(tiny: Any) -> None:
    pre = tiny.preprocess
    with pytest.raises(BadInputType, match=r"^images: expected a PIL image or a list of them, got None$"):
        pre.to_tensor(None)  # type: ignore[arg-type]
    with pytest.raises(BadInputType, match=r"^images: .*got str 'cat\.jpg' \(methods take images, not files"):
        pre.to_tensor("cat.jpg")  # type: ignore[arg-type]
    with pytest.raises(BadInputType, match=r"^images\[2\]: expected a PIL image, got None$"):
        pre.to_tensor([Image.new("RGB", (9, 9)), Image.new("L", (9, 9)), None])  # type: ignore[list-item]
    with pytest.raises(BadInput, match=r"^images: empty tuple"):
        pre.to_tensor(())
    with pytest.raises(BadInputType, match=r"^images: expected a PIL image or a list of them, got a generator"):
        pre.to_tensor(Image.new("RGB", (9, 9)) for _ in range(2))  # type: ignore[arg-type]


def test_load_image_names_a_non_path() -> None:
    with pytest.raises(BadInputType, match=r"^path: expected a file path \(str or os\.PathLike\), got NoneType$"):
        convscope.load_image(None)  # type: ignore[arg-type]


def test_good_inputs_are_unchanged(tiny: Any, good: torch.Tensor) -> None:
    # PIL images, one (C, H, W) image and a float64 batch all give the float32 batch's result.
    reference = convscope.classify(tiny, good)[0]
    picture = Image.new("RGB", (48, 40), (200, 30, 90))
    for images in (picture, [picture], (picture,), good[0], good.double()):
        prediction = convscope.classify(tiny, images)[0]
        assert prediction.indices.tolist() == reference.indices.tolist()
        torch.testing.assert_close(prediction.probabilities, reference.probabilities)


def _count_forwards(module: nn.Module) -> tuple[list[tuple[int, ...]], Any]:
    shapes: list[tuple[int, ...]] = []
    handle = module.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_the_size_check_runs_nothing_at_the_preset_size(tiny: Any, good: torch.Tensor) -> None:
    shapes, handle = _count_forwards(tiny.module)
    try:
        convscope.classify(tiny, torch.cat([good, good]))
    finally:
        handle.remove()
    assert shapes == [(2, 3, 32, 32)]


def test_other_sizes_get_one_single_image_test_run(tiny_cnn: nn.Module) -> None:
    # A wrapped module has the ImageNet preset (224); its own input is 16x16.
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    shapes, handle = _count_forwards(tiny_cnn)
    try:
        convscope.classify(tiny_cnn, x)
    finally:
        handle.remove()
    # Wrapping measures the layers once at the preset (224, cached per module; it fails here and
    # the module wraps unmeasured), then one single-image test run at its own size, then the batch.
    assert shapes == [(1, 3, 224, 224), (1, 3, 16, 16), (3, 3, 16, 16)]
    shapes.clear()
    handle = tiny_cnn.register_forward_pre_hook(lambda m, i: shapes.append(tuple(i[0].shape)))
    try:
        convscope.classify(tiny_cnn, x)
    finally:
        handle.remove()
    assert shapes == [(1, 3, 16, 16), (3, 3, 16, 16)]  # the measurement is not repeated
    # Its preset (224) does not fit it either: the message says so and what to do.
    with pytest.raises(BadInput, match=r"^images: custom fails on a 20x20 input: mat1 and mat2 shapes .* \(and on its preset 224x224 input too; wrap_model it"):
        convscope.gradcam(tiny_cnn, torch.zeros(1, 3, 20, 20))
    wrapped = convscope.wrap_model(tiny_cnn, preprocess=convscope.Preprocess(resize=None, crop=16))
    with pytest.raises(BadInput, match=r"^images: 20x20 pixels does not fit custom: mat1 and mat2 shapes .* \(it takes 16x16;"):
        convscope.gradcam(wrapped, torch.zeros(1, 3, 20, 20))
    with pytest.raises(BadInput, match=r"^images: 8x8 pixels is too small for custom"):
        convscope.gradcam(wrapped, torch.zeros(1, 3, 8, 8))


def test_too_small_for_a_real_network() -> None:
    alexnet = load_model("alexnet", "random", device="cpu")
    with pytest.raises(BadInput, match=r"^images: 32x32 pixels is too small for alexnet: Given input size: \(256x1x1\)"):
        convscope.saliency(alexnet, torch.zeros(1, 3, 32, 32))
    # 64x64 fits (adaptive pooling): no error, a saliency map of that size.
    assert convscope.saliency(alexnet, torch.zeros(1, 3, 64, 64)).maps.shape == (1, 64, 64)


def test_a_network_broken_at_every_size_is_reported_with_its_error_chained(good: torch.Tensor) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("broken model")

    with pytest.raises(BadInput, match="^images: custom fails on a 20x20 input: broken model ") as info:
        convscope.classify(Broken(), torch.zeros(1, 3, 20, 20))
    assert isinstance(info.value.__cause__, RuntimeError)
    # At the preset size nothing is test-run: the network's own error comes through untouched.
    with pytest.raises(RuntimeError, match="^broken model$") as raw:
        convscope.classify(Broken(), torch.zeros(1, 3, 224, 224))
    assert not isinstance(raw.value, ConvscopeError)


def test_deconv_needs_only_its_layer_to_fit(tiny: Any) -> None:
    # 64x64 does not fit tiny's classifier, but deconv never runs the classifier.
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(BadInput, match="does not fit tiny"):
        convscope.gradcam(tiny, x)
    assert convscope.deconv(tiny, x, "conv1", channel=0).projections.shape == (1, 1, 3, 64, 64)


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize(
    ("device", "pattern"),
    [
        ("meta", r"^--device meta: the 'meta' device holds no data, so nothing can be computed on it \(use auto, cpu, cuda, cuda:N or mps\)$"),
        (torch.device("meta"), r"^--device meta: the 'meta' device holds no data"),
        ("xla", r"^--device xla: the 'xla' device is not supported \(use auto"),
        ("gpu", r"^--device gpu: not a device \(use auto, cpu, cuda, cuda:N or mps\)$"),
        ("cuda:x", r"^--device cuda:x: not a device"),
        ("", r"^--device '': not a device"),
        ("mps:1", r"^--device mps:1: there is one MPS device: use mps$"),
        (3, r"^--device 3: expected a device name, got int"),
    ],
)
def test_bad_devices(device: Any, pattern: str) -> None:
    with pytest.raises(BadArgument, match=pattern):
        resolve_device(device)
    with pytest.raises(BadArgument, match=pattern):
        load_model("tiny", "random", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda() -> None:
    with pytest.raises(BadArgument, match=r"^--device cuda:1: CUDA is not available on this machine"):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message on a machine without MPS")
def test_mps_without_mps() -> None:
    with pytest.raises(BadArgument, match=r"^--device mps: MPS \(Apple GPU\) is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("device", ["cpu", "CPU", " cpu ", torch.device("cpu"), "auto", None])
def test_good_devices(device: Any) -> None:
    expected = "cuda" if device in ("auto", None) and torch.cuda.is_available() else "cpu"
    assert resolve_device(device).type == expected


def test_load_model_checks_the_device_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    from convscope.models import registry

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was looked up before the device was checked")

    monkeypatch.setattr(registry, "get_spec", no_build)
    monkeypatch.setattr("convscope.models.load.get_spec", no_build)
    with pytest.raises(BadArgument, match="--device meta"):
        load_model("alexnet", "random", device="meta")


def test_cli_device_meta_is_one_line_exit_2(tmp_path: Path) -> None:
    photo = tmp_path / "cat.png"
    Image.new("RGB", (40, 40)).save(photo)
    done = subprocess.run(
        [sys.executable, "-m", "convscope", "classify", str(photo), "--model", "tiny", "--weights", "random", "--device", "meta"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    expected = (
        "error: --device meta: the 'meta' device holds no data, so nothing can be computed on it"
        " (use auto, cpu, cuda, cuda:N or mps)"
    )
    assert done.stderr.strip().splitlines() == [expected]
    assert done.stdout == ""


def test_finite_check_takes_overflowing_sums_and_mixed_infinities_right() -> None:
    # The fast path sums the batch; a sum that overflows (finite values near float32's max) must
    # not be called infinite, and +inf with -inf (a NaN sum) must still count as two infinities.
    from convscope.validate import _check_finite

    _check_finite(torch.full((1, 3, 4, 4), 3e38), "images")
    _check_finite(torch.full((1, 3, 4, 4), 60000.0, dtype=torch.float16), "images")  # sum overflows in half
    mixed = torch.zeros(1, 3, 4, 4)
    mixed[0, 0, 0, 0], mixed[0, 1, 0, 0] = float("inf"), float("-inf")
    with pytest.raises(BadInput, match=r"^images: holds 0 NaN and 2 infinite values \(of 48\)"):
        _check_finite(mixed, "images")
