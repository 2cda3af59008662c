"""Sanity checks (Adebayo et al. 2018) for every attribution method: HOG against scikit-image,
the randomisation modes re-initialise exactly what they say, Adebayo's qualitative result on the
pretrained default model, the deconvnet map against captum, label randomisation, the CLI record
and panels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convscope
from convscope.analysis.quality import edge_map, quality
from convscope.analysis.sanity import (
    attribution_methods,
    cascade_steps,
    compare_models,
    deconvnet_map,
    hog_features,
    hog_similarity,
    label_randomization,
    method_map,
    randomization,
    sanity_check,
)
from convscope.errors import BadArgument, UnknownMethod
from convscope.methods.registry import _REGISTRY, MethodSpec, get_method, registered

CHELSEA = Path(convscope.__file__).parent / "data" / "chelsea.jpg"


def smooth_noise(seed: int, size: tuple[int, int] = (64, 48)) -> torch.Tensor:
    coarse = torch.rand(1, 1, 8, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0, 0]


def importable(name: str) -> bool:
    """The row's function can be imported (LRP is being written in parallel: until then it is skipped)."""
    if name == "deconv":
        return True
    try:
        get_method(name).resolve_function()
    except (ImportError, AttributeError):
        return False
    return True


# ---------------------------------------------------------------- HOG


@pytest.mark.peer
def test_hog_features_equal_scikit_image() -> None:
    from skimage.data import camera
    from skimage.feature import hog

    grey = camera()[100:180, 150:246].astype(np.float64) / 255.0  # 80 x 96: 10 x 12 cells, 8 x 10 blocks
    noise = smooth_noise(1, (67, 45)).numpy()  # rows and columns past the last whole cell
    for image in (grey, noise):
        ours = hog_features(torch.from_numpy(image)[None])[0].numpy()
        theirs = hog(image, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3), block_norm="L2-Hys")
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-7)


def test_hog_similarity_is_one_for_identical_maps_and_low_for_unrelated_ones() -> None:
    a = smooth_noise(2)
    assert hog_similarity(a, a) == pytest.approx(1.0, abs=1e-12)
    assert hog_similarity(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-9)  # gradients' directions and ratios kept
    unrelated = [hog_similarity(smooth_noise(s), smooth_noise(s + 100)) for s in range(5)]
    assert max(abs(v) for v in unrelated) < 0.3
    assert hog_similarity(a, torch.flip(a, dims=[0])) < 0.5
    assert np.isnan(hog_similarity(a, torch.zeros_like(a)))
    # 28 x 28 (MNIST): cells shrink to 9 pixels so one 3 x 3 block fits
    assert hog_features(torch.rand(2, 28, 28)).shape == (2, 81)


# ---------------------------------------------------------------- methods


def test_every_registered_attribution_method_is_scored() -> None:
    expected = [n for n, s in _REGISTRY.items() if (s.takes_images and s.takes_target) or n == "deconv"]
    assert list(attribution_methods()) == expected
    assert {"guided", "deconv", "guided-gradcam", "saliency", "gradcam", "ig", "smoothgrad", "lrp"} <= set(expected)
    loaded = convscope.load_model("tiny", weights="random", seed=0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1])
    skipped = []
    for name in expected:
        if not importable(name):
            skipped.append(name)
            continue
        maps = method_map(name)(loaded, x, targets, None, 0)
        assert maps.shape == (1, 32, 32), name
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0, name
    assert set(skipped) <= {"lrp", "ig", "smoothgrad"}  # written by other helpers in parallel
    with pytest.raises(UnknownMethod, match="filters"):
        method_map("filters")


def test_a_new_registry_row_is_scored_without_other_changes(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    def doubled_saliency(model: Any, images: torch.Tensor, target: Any = None) -> SimpleNamespace:
        return SimpleNamespace(maps=2 * convscope.saliency(model, images, target=target).maps)

    row = MethodSpec(name="doubled", title="Doubled", summary="Saliency twice.", function=doubled_saliency,
                     renderer="convscope.render.views:saliency_views", takes_target=True)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with registered(row):
        assert "doubled" in attribution_methods()
        ours = quality(tiny_cnn, x, "doubled", ("randomization",), randomization_modes=("top-down",))
    plain = quality(tiny_cnn, x, "saliency", ("randomization",), randomization_modes=("top-down",))
    torch.testing.assert_close(ours.maps, 2 * plain.maps)
    torch.testing.assert_close(ours.randomization.spearman, plain.randomization.spearman)  # scale-free


@pytest.mark.peer
def test_deconvnet_map_equals_captum_deconvolution() -> None:
    from captum.attr import Deconvolution

    loaded = convscope.load_model("zfnet_mnist", weights="random", seed=3)  # nn.ReLU modules, as captum hooks
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([2, 5, 9])
    ours = deconvnet_map(loaded, x, targets, None, 0)
    theirs = Deconvolution(loaded.module.eval()).attribute(x.clone(), target=targets).abs().amax(dim=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, convscope.saliency(loaded, x, target=targets).maps)  # the rule did act


# ---------------------------------------------------------------- the modes


def test_modes_reinitialise_exactly_the_layers_they_say_and_never_the_callers_model(assert_no_side_effects) -> None:  # type: ignore[no-untyped-def]
    # A seeded random model: re-initialising with the run's own seed would give its weights back.
    loaded = convscope.load_model("zfnet_mnist", weights="random", seed=0)
    original = {n: p.detach().clone() for n, p in loaded.module.named_parameters()}
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([3, 7])
    seen: list[dict[str, torch.Tensor]] = []

    def recorder(twin, batch, targets, layer, seed):  # type: ignore[no-untyped-def]
        seen.append({n: p.detach().clone() for n, p in twin.module.named_parameters()})
        return convscope.saliency(twin, batch, target=targets).maps

    maps = recorder(loaded, x, targets, None, 0)
    seen.clear()
    steps = cascade_steps(loaded)
    modules = dict(loaded.module.named_modules())
    assert list(steps) == ["classifier.4", "conv5", "conv4", "conv3", "conv2", "conv1"]
    runs = {}
    for mode in ("top-down", "bottom-up", "independent"):
        seen.clear()
        runs[mode] = run = assert_no_side_effects(
            loaded.module, lambda mode=mode: randomization(loaded, x, maps, targets, recorder, mode=mode))
        assert run.layers == (tuple(reversed(steps)) if mode == "bottom-up" else tuple(steps))
        assert len(seen) == len(run.layers) and run.kept == ()
        for k, weights in enumerate(seen):
            random_modules = set(run.randomized(k))
            for name, value in weights.items():
                module = name.rpartition(".")[0]
                if name.endswith(".weight") and isinstance(modules[module], (nn.Conv2d, nn.Linear)):
                    assert torch.equal(value, original[name]) == (module not in random_modules), (mode, k, name)
                elif module not in random_modules:  # a norm re-initialised gets its init values (ones, zeros)
                    assert torch.equal(value, original[name]), (mode, k, name)
    for name, value in loaded.module.named_parameters():
        assert torch.equal(value, original[name])
    top, bottom, alone = runs["top-down"], runs["bottom-up"], runs["independent"]
    assert alone.randomized(2) == tuple(steps["conv4"])  # one step only
    assert top.randomized(2) == tuple(steps["classifier.4"] + steps["conv5"] + steps["conv4"])  # cumulative
    # Each mode's first step re-initialises from a fresh generator: the same weights as the independent step.
    torch.testing.assert_close(top.maps[:, 0], alone.maps[:, 0])
    torch.testing.assert_close(bottom.maps[:, 0], alone.maps[:, -1])
    assert top.spearman.shape == top.ssim.shape == top.hog.shape == (2, 6)


def test_unknown_mode_and_empty_modes_are_refused(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(BadArgument, match=r"^randomization mode sideways: must be one of top-down, bottom-up, independent$"):
        quality(tiny_cnn, x, "saliency", ("randomization",), randomization_modes=("sideways",))
    with pytest.raises(BadArgument, match="names nothing"):
        quality(tiny_cnn, x, "saliency", ("randomization",), randomization_modes=())


# ---------------------------------------------------------------- Adebayo's result


@pytest.mark.slow
def test_guided_backprop_survives_randomising_the_top_half_where_gradcam_and_saliency_do_not(default_model) -> None:  # type: ignore[no-untyped-def]
    photo = Image.open(CHELSEA).convert("RGB")
    guided = convscope.guided_backprop(default_model, photo)
    assert guided.rules is not None and guided.rules.applied  # EfficientNet-Lite's ReLU6: the rule acts
    steps = list(cascade_steps(default_model))
    top_half = steps[: len(steps) // 2]
    assert top_half == ["classifier.1", "head", "stage7", "stage6", "stage5"]
    rho = {}
    for name in ("guided", "gradcam", "saliency"):
        _, runs = sanity_check(default_model, photo, name, modes=("top-down",), layers=top_half)
        rho[name] = float(runs["top-down"].spearman[0, -1])
    assert rho["guided"] > rho["gradcam"] and rho["guided"] > rho["saliency"], rho
    assert rho["guided"] > 0.5 and rho["gradcam"] < 0.5, rho


# ---------------------------------------------------------------- label randomisation


def test_compare_models_gives_one_for_a_map_that_ignores_the_model() -> None:
    a = convscope.load_model("zfnet_mnist", weights="random", seed=1)
    b = convscope.load_model("zfnet_mnist", weights="random", seed=2)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = compare_models(a, b, x, ["saliency", edge_map])
    assert torch.equal(result.spearman["edge_map"], torch.ones(3))
    torch.testing.assert_close(result.hog["edge_map"], torch.ones(3))
    assert float(result.spearman["saliency"].mean()) < 0.9
    assert result.maps["saliency"].shape == (3, 2, 28, 28)


@pytest.mark.slow
def test_label_randomisation_trains_both_models_for_the_same_steps(tmp_path: Path) -> None:
    from convscope.training.data import fashion_mnist_available

    data = "fashion-mnist" if fashion_mnist_available() else "digits"
    result = label_randomization("zfnet_mnist", data, ("saliency", "guided", "gradcam"), limit=256, epochs=2,
                                 batch_size=32, images=6, workdir=tmp_path)
    assert result.steps == 2 * (256 // 32)
    assert result.shuffled_fraction > 0.8
    for kind in ("true", "shuffled"):
        history = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
        assert len(history) == 2
    assert result.test_accuracy["true"] > result.test_accuracy["shuffled"] + 0.15, result.test_accuracy
    for name in ("saliency", "guided", "gradcam"):
        for key in ("spearman", "ssim", "hog"):
            values = result.comparison.similarity(key)[name]
            finite = values[~values.isnan()]  # nan: a map that is constant (a Grad-CAM that found nothing)
            assert values.shape == (6,) and len(finite) >= 4 and bool(((finite >= -1) & (finite <= 1)).all())
    assert float(result.comparison.spearman["saliency"].mean()) < 0.9


# ---------------------------------------------------------------- the CLI


def run_cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convscope", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_the_panels_the_sanity_table_and_the_quantus_record(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    images = []
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        images.append(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    proc = run_cli("quality", *images, "--model", "tiny", "--weights", "random", "--methods", "gradcam,guided,deconv",
                   "--metrics", "randomization,deletion", "--randomization", "top-down,independent",
                   "--protocol", "quantus", "-o", out)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "quality.json").read_text())
    sanity = record["sanity"]
    assert sanity["modes"] == ["top-down", "independent"] and list(sanity["methods"]) == ["gradcam", "guided", "deconv"]
    for method, per_mode in sanity["methods"].items():
        assert list(per_mode) == ["top-down", "independent"]
        for table in per_mode.values():
            assert table["layers"] == ["classifier", "conv2", "conv1"]
            for key in ("spearman", "ssim", "hog"):
                per_image = np.array(table[key]["per_image"], dtype=float)
                assert per_image.shape == (2, 3)
                np.testing.assert_allclose(table[key]["mean"], per_image.mean(axis=0), rtol=1e-6)
                np.testing.assert_allclose(table[key]["std"], per_image.std(axis=0), rtol=1e-6, atol=1e-9)
        # the compact record of earlier versions: the first mode
        assert record["methods"][method]["randomization"]["mode"] == "top-down"
    names = {p.name for p in out.iterdir()}
    assert {"randomization.png", "quality.txt", "manifest.json"} <= names
    for stem in ("a", "b"):
        for mode in ("top-down", "independent"):
            panel = np.asarray(Image.open(out / f"randomization_{stem}_{mode}.png"))
            assert panel.shape[0] > 3 * 112 and panel.shape[1] > 5 * 112  # 3 methods x (photo, original, 3 steps)
    assert "bottom-up" not in (out / "quality.txt").read_text()
    # --protocol quantus: Quantus' curves of the same maps and of the baselines, no RISE curves
    assert record["protocol"]["name"] == "quantus"
    assert set(record["faithfulness"]["methods"]) == {"gradcam", "guided", "deconv", "random", "edges"}
    assert "quality_curves.png" not in names and "deletion" not in record["methods"]["gradcam"]


def test_cli_refuses_an_unknown_protocol(tmp_path: Path) -> None:
    proc = run_cli("quality", CHELSEA, "--model", "tiny", "--weights", "random", "--protocol", "lime",
                   "-o", tmp_path / "bad")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: --protocol lime: must be one of rise, quantus"
    assert not (tmp_path / "bad").exists()


def test_label_randomisation_never_replaces_what_a_workdir_holds(tmp_path: Path) -> None:
    from convscope.analysis.sanity import label_randomization

    mine = tmp_path / "shuffled"
    mine.mkdir()
    (mine / "best.pt").write_bytes(b"the user's run")
    with pytest.raises(BadArgument, match=r"^workdir .*: already holds shuffled; nothing there is replaced"):
        label_randomization(workdir=tmp_path)
    assert (mine / "best.pt").read_bytes() == b"the user's run"
    assert not (tmp_path / "true-data").exists()
