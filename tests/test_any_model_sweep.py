"""The any-model sweep: every classification architecture in torchvision's registry under 100 M
parameters and 20 timm families, with random weights at their own input size. Every method either
runs or refuses in one line (a ``ConvscopeError`` whose message is a single line); no other
exception escapes.

Marked ``sweep``: it takes minutes, so ``make test`` leaves it out and ``make sweep`` (run by CI
after ``make test``) runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import convscope
from convscope.errors import ConvscopeError
from convscope.models.load import load_model

pytestmark = [pytest.mark.sweep, pytest.mark.slow]

torchvision = pytest.importorskip("torchvision")


def _torchvision_names() -> list[str]:
    from torchvision.models import get_model_weights, list_models

    names = list_models(module=torchvision.models)
    return sorted(n for n in names if get_model_weights(n).DEFAULT.meta["num_params"] < 100_000_000)


TIMM_FAMILIES = [
    "resnet18", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv2_050",
    "convnext_atto", "regnety_002", "densenet121", "dla34", "ghostnet_100", "hrnet_w18_small", "vgg11",
    "rexnet_100", "mixnet_s", "levit_128s", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
    "mobilevit_xxs", "repvgg_a0", "edgenext_xx_small",
]


def _methods(loaded: Any, image: torch.Tensor) -> dict[str, Callable[[], Any]]:
    side = int(image.shape[-1])
    window = max(1, side // 2)
    return {
        "classify": lambda: convscope.classify(loaded, image),
        "summary": lambda: convscope.summary(loaded),
        "activation_maps": lambda: convscope.activation_maps(loaded, image),
        "feature_maps": lambda: convscope.feature_maps(loaded, image, layer=loaded.cam_layer or "stage1", max_channels=8),
        "filters": lambda: convscope.conv_filters(loaded),
        "gradcam": lambda: convscope.gradcam(loaded, image),
        "gradcampp": lambda: convscope.gradcampp(loaded, image),
        "guided_gradcam": lambda: convscope.guided_gradcam(loaded, image),
        "guided": lambda: convscope.guided_backprop(loaded, image),
        "saliency": lambda: convscope.saliency(loaded, image),
        "deconv": lambda: convscope.deconv(loaded, image, layer=loaded.cam_layer or "stage1", top=2),
        "occlusion": lambda: convscope.occlusion(loaded, image, window=window, stride=window),
        "lrp": lambda: convscope.lrp(loaded, image),
        "ig": lambda: convscope.integrated_gradients(loaded, image, steps=2),
        "smoothgrad": lambda: convscope.smoothgrad(loaded, image, samples=1),
    }


def _sweep(spec: str) -> dict[str, str]:
    try:
        loaded = load_model(spec, "random")
    except ConvscopeError as exc:
        assert "\n" not in str(exc), f"{spec}: a refusal must be one line: {exc}"
        return {"load": f"refused: {exc}"}
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, *loaded.preprocess.input_size), generator=generator)
    outcome: dict[str, str] = {}
    for name, run in _methods(loaded, image).items():
        try:
            with torch.random.fork_rng(devices=[]):
                run()
            outcome[name] = "ran"
        except ConvscopeError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"{spec} {name}: a refusal must be one line: {message!r}"
            outcome[name] = f"refused: {message}"
        except Exception as exc:  # noqa: BLE001 - the point of the sweep: nothing else escapes
            pytest.fail(f"{spec} {name}: {type(exc).__name__} escaped: {exc}")
    assert not loaded.module._forward_hooks and not loaded.module._forward_pre_hooks
    return outcome


@pytest.mark.parametrize("name", _torchvision_names())
def test_torchvision_architecture(name: str) -> None:
    outcome = _sweep(f"torchvision:{name}")
    # Every CNN of the registry runs Grad-CAM at its measured default layer.
    if not name.startswith(("vit", "swin", "maxvit")):
        assert outcome.get("gradcam") == "ran", outcome


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_family(name: str) -> None:
    pytest.importorskip("timm")
    outcome = _sweep(f"timm:{name}")
    assert outcome.get("classify") == "ran", outcome
