"""Occlusion against captum's ``Occlusion`` on the same window, stride, fill and target.

captum perturbs the normalised input tensor, so its ``baselines`` is our ``fill`` in input
space; a grey square in pixel space (``fill="grey"``) is passed to captum as the per-channel
normalised value. captum attributes ``softmax(model(x))[target]`` drops to every pixel of a
window and averages overlapping windows: that is our ``pixel_drop``. Its grid covers the
border with clipped windows: our ``cover_border=True`` (the default grid equals it whenever
the stride lands on the border).
"""

from __future__ import annotations

import pytest
import torch

from convscope.methods.occlusion import occlusion, resolve_fill
from convscope.models.load import load_model

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.peer


def captum_occlusion(module, image, target, window, stride, baseline):
    def probabilities(x):
        return torch.softmax(module(x), dim=1)

    with torch.no_grad():
        result = captum_attr.Occlusion(probabilities).attribute(
            image, sliding_window_shapes=(image.shape[1], window, window),
            strides=(image.shape[1], stride, stride), baselines=baseline, target=target,
            perturbations_per_eval=64,
        )
    # The window spans every channel, so the channels carry the same value.
    assert torch.equal(result[0, 0], result[0, -1])
    return result[0, 0]


def check(result, theirs, window, stride):
    drop_scale = float(theirs.abs().max())
    assert drop_scale > 0
    # Absolute (issue 3) and relative to the map's own scale (random weights give small drops).
    torch.testing.assert_close(result.pixel_drop[0], theirs, rtol=0, atol=min(1e-4, 1e-3 * drop_scale))
    # Per window: a pixel covered by one window only (top-left corner) is that window's drop.
    assert abs(float(result.drop[0, 0, 0]) - float(theirs[0, 0])) <= 1e-3 * drop_scale + 1e-7


def test_default_model_grey_square(default_model, photo) -> None:
    image = default_model.preprocess.to_tensor(photo)
    fill = resolve_fill("grey", default_model.preprocess.mean, default_model.preprocess.std, 3)
    assert fill == (0.0, 0.0, 0.0)  # EfficientNet-Lite normalises with mean 0.5, std 0.5
    result = occlusion(default_model, image, window=32, stride=16, fill="grey")
    assert result.labels[0] in ("Egyptian cat", "tabby", "tiger cat")
    assert result.stats.mode == "incremental" and "features.2.1" in result.stats.incremental_layers
    assert result.stats.work_fraction < 0.85
    theirs = captum_occlusion(default_model.module, image, int(result.targets[0]), 32, 16, 0.0)
    check(result, theirs, 32, 16)
    assert float(result.drop.max()) > 0.05  # hiding the cat's face matters


@pytest.mark.parametrize(("name", "window", "stride", "fill"), [("alexnet", 32, 16, "grey"), ("vgg16", 32, 32, 0.0)])
def test_seeded_imagenet_models(name, window, stride, fill, photo) -> None:
    loaded = load_model(name, weights="random", seed=0)
    image = loaded.preprocess.to_tensor(photo)
    result = occlusion(loaded, image, window=window, stride=stride, fill=fill)
    assert result.stats.mode == "incremental"
    assert result.stats.work_fraction < 0.8
    baseline = torch.tensor(result.fill).view(1, 3, 1, 1).expand_as(image).contiguous() if fill == "grey" else fill
    theirs = captum_occlusion(loaded.module, image, int(result.targets[0]), window, stride, baseline)
    check(result, theirs, window, stride)


def test_border_windows_match_captum_grid(photo) -> None:
    loaded = load_model("alexnet", weights="random", seed=0)
    image = loaded.preprocess.to_tensor(photo)[:, :, :200, :215]
    result = occlusion(loaded, image, 7, window=30, stride=20, fill=-1.0, cover_border=True)
    assert (len(result.row_origins), len(result.col_origins)) == (10, 11)  # clipped last windows
    theirs = captum_occlusion(loaded.module, image, 7, 30, 20, -1.0)
    check(result, theirs, 30, 20)
