"""Integrated Gradients and SmoothGrad: equal to captum on real photos and real-size weights,
completeness, determinism, chunking, argument errors and the CLI commands.

Models: the pretrained default (EfficientNet-Lite0) and a seeded random ResNet-18, on the photos
resized to 112 and 96 pixels (a few milliseconds per pass, so the peer runs stay short); the CLI
tests run the default model at its own 224.
Tolerance against captum: the largest absolute difference over the batch, divided by the
largest absolute attribution (``relative_error``), at most 1e-5.

How captum gets our noise: ``NoiseTunnel`` draws ``torch.normal(0, stdev)`` in its static
``_add_noise_to_input(input, stdev, n)`` and adds it to ``input.repeat_interleave(n)``
(image-major, as ours). The tests replace that one method with one returning the input plus
the noise the test built itself from the documented recipe (``numpy.random.default_rng((seed,
sample))`` standard normals times ``noise x (max - min)`` of each image), so both sides add the
same tensor and a wrong noise scale or draw on our side fails the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from convscope.errors import BadArgument, BadInput, BadInputType
from convscope.methods import paths
from convscope.methods.paths import baseline_batch, blurred, integrated_gradients, quadrature, smoothgrad
from convscope.models.load import load_model
from convscope.types import LoadedModel

IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def resnet18() -> LoadedModel:
    return load_model("resnet18", "random", seed=0, device="cpu")


@pytest.fixture(scope="module")
def pair(resnet18: LoadedModel, photo: Image.Image, coffee: Image.Image) -> torch.Tensor:
    """Chelsea and coffee, normalised for ResNet-18, at 96 x 96."""
    return F.interpolate(resnet18.preprocess.to_tensor([photo, coffee]), size=96, mode="bilinear", antialias=True)


@pytest.fixture(scope="module")
def cat(default_model: LoadedModel, photo: Image.Image) -> torch.Tensor:
    """Chelsea, normalised for the default model, at 112 x 112."""
    return F.interpolate(default_model.preprocess.to_tensor([photo]), size=112, mode="bilinear", antialias=True)


# ---------------------------------------------------------------- quadrature and baselines


@pytest.mark.peer
@pytest.mark.parametrize("method", IG_METHODS)
@pytest.mark.parametrize("steps", [2, 7, 50])
def test_quadrature_is_captums(method: str, steps: int) -> None:
    from captum.attr._utils.approximation_methods import approximation_parameters

    sizes, alphas = approximation_parameters(method)
    ours_alphas, ours_weights = quadrature(method, steps)
    assert ours_alphas.tolist() == pytest.approx(alphas(steps), abs=1e-15)
    assert ours_weights.tolist() == pytest.approx(sizes(steps), abs=1e-15)
    # captum's trapezoid keeps weights 1/steps on points 1/(steps - 1) apart: they sum to 1 - 1/steps
    total = 1 - 1 / steps if method == "riemann_trapezoid" else 1.0
    assert float(ours_weights.sum()) == pytest.approx(total, abs=1e-12)


def test_quadrature_integrates_a_polynomial() -> None:
    # Gauss-Legendre with n points is exact for degree 2n - 1: integral_0^1 a^5 da = 1/6 with 3 points.
    alphas, weights = quadrature("gausslegendre", 3)
    assert float((weights * alphas**5).sum()) == pytest.approx(1 / 6, abs=1e-14)
    alphas, weights = quadrature("riemann_trapezoid", 3)
    assert alphas.tolist() == [0.0, 0.5, 1.0] and weights.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 6])


def test_black_baseline_is_a_black_photo(default_model: LoadedModel, photo: Image.Image) -> None:
    batch = default_model.preprocess.to_tensor([photo])
    black, described = baseline_batch(default_model, batch, "black")
    expected = default_model.preprocess.to_tensor([Image.new("RGB", photo.size)])
    assert described == "black" and black.shape == batch.shape
    torch.testing.assert_close(black, expected, rtol=0, atol=1e-6)


def test_blur_baseline_is_the_documented_gaussian(resnet18: LoadedModel, pair: torch.Tensor) -> None:
    from torchvision.transforms.v2.functional import gaussian_blur

    sigma = paths.BLUR_SIGMA * 96
    size = 2 * math.ceil(3 * sigma) + 1
    expected = gaussian_blur(pair, kernel_size=[size, size], sigma=[sigma, sigma])
    torch.testing.assert_close(blurred(pair), expected, rtol=0, atol=1e-5)
    # strongly blurred: under a quarter of the photo's pixel-to-pixel detail
    detail = (pair[..., 1:] - pair[..., :-1]).abs().mean()
    assert float((blurred(pair)[..., 1:] - blurred(pair)[..., :-1]).abs().mean()) < 0.25 * float(detail)


# ---------------------------------------------------------------- Integrated Gradients vs captum


def captum_ig(loaded: LoadedModel, batch: torch.Tensor, baseline: torch.Tensor, targets: torch.Tensor,
              steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr import IntegratedGradients

    loaded.module.eval()
    attributions, delta = IntegratedGradients(loaded.module).attribute(
        batch, baselines=baseline, target=targets, n_steps=steps, method=method,
        internal_batch_size=64, return_convergence_delta=True)
    return attributions.detach(), delta.detach()


@pytest.mark.peer
@pytest.mark.parametrize("method", IG_METHODS)
def test_ig_equals_captum_for_every_method(resnet18: LoadedModel, pair: torch.Tensor, method: str) -> None:
    result = integrated_gradients(resnet18, pair, steps=8, method=method)
    attributions, delta = captum_ig(resnet18, pair, torch.zeros_like(pair), result.targets, 8, method)
    assert result.method == "integrated_gradients" and result.attributions.shape == pair.shape
    assert relative_error(result.attributions, attributions) < 1e-5
    torch.testing.assert_close(result.maps, result.attributions.sum(1))
    assert result.settings == {"steps": 8, "method": method, "baseline": 0.0}
    assert result.completeness is not None
    torch.testing.assert_close(result.completeness, delta, rtol=0, atol=1e-4 * float(result.scores.abs().max()))


@pytest.mark.peer
@pytest.mark.parametrize("baseline", ["number", "tensor", "black", "blur"])
def test_ig_equals_captum_for_every_baseline(default_model: LoadedModel, cat: torch.Tensor, baseline: str) -> None:
    batch = cat
    given: Any = {"number": -0.5, "black": "black", "blur": "blur",
                  "tensor": torch.randn(batch.shape[1:], generator=torch.Generator().manual_seed(3)) * 0.2}[baseline]
    result = integrated_gradients(default_model, batch, target=282, steps=8, baseline=given)
    if baseline == "number":
        peer_baseline: Any = -0.5
    elif baseline == "tensor":
        peer_baseline = given[None]
    elif baseline == "black":  # captum has no names: it gets a black photo's input
        peer_baseline = default_model.preprocess.to_tensor([Image.new("RGB", (112, 112))])[..., :112, :112]
    else:
        peer_baseline = blurred(batch)
    attributions, delta = captum_ig(default_model, batch, peer_baseline, result.targets, 8, "gausslegendre")
    assert relative_error(result.attributions, attributions) < 1e-5
    assert result.completeness is not None
    assert float((result.completeness - delta).abs().max()) < 1e-4 * float(result.scores.abs().max())
    assert int(result.targets[0]) == 282 and result.labels[0] == default_model.categories[282]


@pytest.mark.peer
@pytest.mark.slow
def test_completeness_error_falls_with_steps_and_equals_captums_delta(default_model: LoadedModel,
                                                                     cat: torch.Tensor) -> None:
    # The pretrained network is far from linear along the path (a random ResNet is nearly
    # linear there: its error is at float rounding from 8 steps on, and shows nothing).
    errors, warnings = [], []
    for steps in (8, 32, 128):
        result = integrated_gradients(default_model, cat, target=282, steps=steps, method="riemann_right")
        assert result.completeness is not None
        errors.append(float(result.completeness.abs()[0]))
        warnings.append(result.warnings)
        if steps < 128:  # the peer's 128-step run adds nothing but time
            _, delta = captum_ig(default_model, cat, torch.zeros_like(cat), result.targets, steps, "riemann_right")
            assert float((result.completeness - delta).abs().max()) < 1e-4 * float(result.scores.abs().max())
        # completeness is its definition: the sum of the attributions minus the score change
        with torch.no_grad():
            change = default_model.module(cat)[0, 282] - default_model.module(torch.zeros_like(cat))[0, 282]
        assert float(result.completeness[0]) == pytest.approx(
            float(result.attributions.double().sum()) - float(change), abs=1e-3)
    assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 2, errors
    assert "miss the score change by up to" in warnings[0][0] and not warnings[2], warnings


def test_ig_is_the_same_in_any_chunking(resnet18: LoadedModel, pair: torch.Tensor,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    whole = integrated_gradients(resnet18, pair, steps=7, method="riemann_middle", baseline="blur")
    monkeypatch.setattr(paths, "_chunk_size", lambda *_: 3)  # groups split across chunks: carried over
    split = integrated_gradients(resnet18, pair, steps=7, method="riemann_middle", baseline="blur")
    assert relative_error(split.attributions, whole.attributions) < 1e-6
    assert split.completeness is not None and whole.completeness is not None
    torch.testing.assert_close(split.completeness, whole.completeness, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- SmoothGrad vs captum's NoiseTunnel


def documented_noise(batch: torch.Tensor, samples: int, noise: float, seed: int) -> torch.Tensor:
    """``(N * samples, C, H, W)`` image-major: sample s of image i is sigma_i * eps_s."""
    scale = noise * (batch.flatten(1).amax(1) - batch.flatten(1).amin(1))
    eps = torch.stack([torch.from_numpy(np.random.default_rng((seed, s)).standard_normal(batch.shape[1:],
                                                                                          dtype=np.float32))
                       for s in range(samples)])
    return (scale.view(-1, 1, 1, 1, 1) * eps[None]).flatten(0, 1)


def captum_smoothgrad(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel, batch: torch.Tensor,
                      targets: torch.Tensor, base: str, samples: int, noise: float, seed: int) -> torch.Tensor:
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    drawn = documented_noise(batch, samples, noise, seed)
    calls = []

    def same_noise(input: torch.Tensor, stdev: float, count: int) -> torch.Tensor:
        calls.append(count)
        return input.repeat_interleave(count, dim=0) + drawn

    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(same_noise))
    loaded.module.eval()
    kind = {"saliency": Saliency, "guided": GuidedBackprop, "ig": IntegratedGradients}[base]
    extra: dict[str, Any] = {"abs": False} if base == "saliency" else {}
    if base == "ig":
        extra = {"baselines": 0.0, "n_steps": 50, "method": "gausslegendre", "internal_batch_size": 50 * samples}
    out = NoiseTunnel(kind(loaded.module)).attribute(batch, nt_type="smoothgrad", nt_samples=samples,
                                                     stdevs=1.0, target=targets, **extra)
    assert calls == [samples]
    return out.detach()


@pytest.mark.peer
@pytest.mark.parametrize("base", ["saliency", "guided"])
def test_smoothgrad_equals_noise_tunnel(resnet18: LoadedModel, pair: torch.Tensor, base: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    result = smoothgrad(resnet18, pair, base=base, samples=6, noise=0.2, seed=5)
    theirs = captum_smoothgrad(monkeypatch, resnet18, pair, result.targets, base, 6, 0.2, 5)
    assert result.method == "smoothgrad" and result.completeness is None
    assert relative_error(result.attributions, theirs) < 1e-5
    assert result.settings == {"base": base, "samples": 6, "noise": 0.2, "seed": 5}
    # the signed gradient is averaged (captum's Saliency default, abs=True, is a different map)
    assert float(result.attributions.min()) < 0


@pytest.mark.peer
def test_smoothgrad_of_ig_equals_noise_tunnel(resnet18: LoadedModel, pair: torch.Tensor,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    batch = F.interpolate(pair[1:], size=64, mode="bilinear", antialias=True)
    result = smoothgrad(resnet18, batch, base="ig", samples=2, noise=0.1, seed=1)
    theirs = captum_smoothgrad(monkeypatch, resnet18, batch, result.targets, "ig", 2, 0.1, 1)
    assert relative_error(result.attributions, theirs) < 1e-5
    assert result.settings["ig"] == {"steps": 50, "method": "gausslegendre", "baseline": 0.0}


def test_smoothgrad_is_seeded_and_batch_independent(resnet18: LoadedModel, pair: torch.Tensor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    both = smoothgrad(resnet18, pair, samples=5, seed=7)
    again = smoothgrad(resnet18, pair, samples=5, seed=7)
    assert torch.equal(both.attributions, again.attributions)
    alone = smoothgrad(resnet18, pair[1:], samples=5, seed=7)
    assert relative_error(alone.attributions[0], both.attributions[1]) < 1e-6
    monkeypatch.setattr(paths, "_chunk_size", lambda *_: 2)
    chunked = smoothgrad(resnet18, pair, samples=5, seed=7)
    assert relative_error(chunked.attributions, both.attributions) < 1e-6
    other = smoothgrad(resnet18, pair, samples=5, seed=8)
    assert relative_error(other.attributions, both.attributions) > 1e-2
    # no noise: every sample is the photo, so SmoothGrad is the plain signed gradient
    from convscope.methods.guided import saliency

    plain = smoothgrad(resnet18, pair, samples=2, noise=0.0)
    # to rounding: SmoothGrad's copy applies each BatchNorm's scale to the convolution weight in
    # the backward (probes.gradfold), saliency's network applies it to the map (1.6e-6 measured)
    assert relative_error(plain.attributions, saliency(resnet18, pair).attributions) < 1e-5


def test_model_is_left_as_found(tiny_cnn: torch.nn.Module, assert_no_side_effects: Any) -> None:
    tiny_cnn.train()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_no_side_effects(tiny_cnn, lambda: integrated_gradients(tiny_cnn, x, steps=5))
    assert_no_side_effects(tiny_cnn, lambda: smoothgrad(tiny_cnn, x, base="guided", samples=3))
    assert_no_side_effects(tiny_cnn, lambda: smoothgrad(tiny_cnn, x, base="ig", samples=2))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"steps": 0}, BadArgument, r"^steps 0: must be between 1 and 4096$"),
    ({"steps": 1, "method": "riemann_left"}, BadArgument, r"^steps 1: must be at least 2 for riemann_left"),
    ({"steps": 5000}, BadArgument, r"^steps 5000: must be between"),
    ({"steps": 2.5}, BadInputType, r"^steps: must be a whole number"),
    ({"method": "gauss"}, BadArgument, r"^method 'gauss': is not an integration method \(did you mean: gausslegendre"),
    ({"baseline": torch.zeros(3, 5, 5)}, BadInput, r"^baseline: has shape \(3, 5, 5\); expected \(\), \(3, 16, 16\)"),
    ({"baseline": torch.zeros(3, 3, 16, 16)}, BadInput, r"^baseline: has shape \(3, 3, 16, 16\)"),
    ({"baseline": torch.full((3, 16, 16), float("nan"))}, BadInput, r"^baseline: has NaN"),
    ({"baseline": "grey"}, BadArgument, r"^baseline 'grey': is not black, blur or a number"),
    ({"baseline": float("inf")}, BadArgument, r"^baseline inf: must be a finite number"),
    ({"baseline": None}, BadInputType, r"^baseline: expected a number, a tensor, 'black' or 'blur', got None"),
    ({"baseline": [0.0]}, BadInputType, r"^baseline: expected a number"),
])
def test_ig_bad_arguments_are_one_line_errors(tiny_cnn: torch.nn.Module, kwargs: dict[str, Any],
                                              error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        integrated_gradients(tiny_cnn, torch.zeros(2, 3, 16, 16), **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"samples": 0}, BadArgument, r"^samples 0: must be between 1 and 4096$"),
    ({"samples": 2000, "base": "ig"}, BadArgument, r"^samples 2000: must be between 1 and 1310$"),
    ({"base": "gradient"}, BadArgument, r"^base 'gradient': is not a SmoothGrad base"),
    ({"noise": -0.1}, BadArgument, r"^noise -0.1: must be between 0 and 10"),
    ({"noise": float("nan")}, BadArgument, r"^noise nan: must be a finite number"),
    ({"seed": -1}, BadArgument, r"^seed -1: must be between 0 and"),
])
def test_smoothgrad_bad_arguments_are_one_line_errors(tiny_cnn: torch.nn.Module, kwargs: dict[str, Any],
                                                      error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        smoothgrad(tiny_cnn, torch.zeros(2, 3, 16, 16), **kwargs)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cat_file(tmp_path_factory: pytest.TempPathFactory, photo: Image.Image) -> Path:
    path = tmp_path_factory.mktemp("photos") / "cat.png"
    photo.save(path)
    return path


@pytest.mark.slow
def test_cli_ig_writes_pictures_and_completeness(cat_file: Path, tmp_path: Path, default_model: LoadedModel,
                                                 photo: Image.Image) -> None:
    from convscope.cli.main import app

    result = CliRunner().invoke(app, ["ig", str(cat_file), "--steps", "16", "--baseline", "black",
                                      "--method", "riemann_trapezoid", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.glob("*.png")} == {"cat_ig.png", "cat_ig_overlay.png"}
    record = json.loads((tmp_path / "ig.json").read_text())[0]
    assert record["settings"] == {"steps": 16, "method": "riemann_trapezoid", "baseline": "black"}
    assert record["label"] == "Egyptian cat" or record["class"] in (281, 282, 285)
    error = record["completeness_error"]
    assert isinstance(error, float) and error != 0.0
    with torch.no_grad():  # the attributions' sum is the score change from black to the photo, plus the error
        black = default_model.module(default_model.preprocess.to_tensor([Image.new("RGB", photo.size)]))
    change = record["score"] - float(black[0, record["class"]])
    assert record["sum"] - error == pytest.approx(change, abs=1e-3)
    assert Image.open(tmp_path / "cat_ig.png").size[0] >= 224


@pytest.mark.slow
def test_cli_smoothgrad_writes_pictures_and_json(cat_file: Path, tmp_path: Path) -> None:
    from convscope.cli.main import app

    result = CliRunner().invoke(app, ["smoothgrad", str(cat_file), "--samples", "4", "--noise", "0.1",
                                      "--seed", "3", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.glob("*.png")} == {"cat_smoothgrad.png", "cat_smoothgrad_overlay.png"}
    record = json.loads((tmp_path / "smoothgrad.json").read_text())[0]
    assert record["settings"] == {"base": "saliency", "samples": 4, "noise": 0.1, "seed": 3}
    assert record["completeness_error"] is None


def test_cli_bad_steps_is_one_error_line(cat_file: Path, tmp_path: Path) -> None:
    from convscope.cli.main import app

    result = CliRunner().invoke(app, ["ig", str(cat_file), "--steps", "1", "--method", "riemann_left",
                                      "-o", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "steps" in lines[0], result.stderr
