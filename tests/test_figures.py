"""Self-describing figures (captions, colour bars, enlargement) and notebook rendering of results."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import convscope
from convscope.render import figures
from convscope.render.figures import RANDOM_WEIGHTS_NOTE, ModelInfo, caption_lines, caption_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny():
    return convscope.load_model("tiny", weights="random", seed=0)


@pytest.fixture(scope="module")
def batch(tiny, photo):
    return tiny.preprocess.to_tensor(photo)


def _results(tiny, batch):
    from convscope.methods.predict import classify

    stage = next(iter(tiny.stages))
    return {
        "prediction": classify(tiny, batch, topk=5)[0],
        "summary": convscope.summary(tiny),
        "activations": convscope.activation_maps(tiny, batch),
        "features": convscope.feature_maps(tiny, batch, layer=stage, max_channels=8, order="activation"),
        "filters": convscope.conv_filters(tiny),
        "gradcam": convscope.gradcam(tiny, batch),
        "gradcampp": convscope.gradcampp(tiny, batch),
        "guided_gradcam": convscope.guided_gradcam(tiny, batch),
        "guided": convscope.guided_backprop(tiny, batch),
        "saliency": convscope.saliency(tiny, batch),
        "deconv": convscope.deconv(tiny, batch, stage, top=4),
        "occlusion": convscope.occlusion(tiny, batch, window=8, stride=8),
    }


def test_every_result_renders_for_a_notebook(tiny, batch, photo) -> None:
    for name, result in _results(tiny, batch).items():
        for image in (None, photo):
            picture = result.to_image(image, model=tiny)
            assert picture.mode == "RGB", name
            assert picture.width >= 224, (name, picture.size)
        data = result._repr_png_()
        assert data.startswith(PNG_SIGNATURE), name
        assert Image.open(io.BytesIO(data)).width >= 224, name


def test_save_writes_the_same_png(tiny, batch, tmp_path) -> None:
    cam = convscope.gradcam(tiny, batch)
    path = cam.save(tmp_path / "cam.png", batch, model=tiny)
    saved = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(saved, np.asarray(cam.to_image(batch, model=tiny)))
    assert [p.name for p in tmp_path.iterdir()] == ["cam.png"]  # atomic: no temp file left


def test_results_import_no_drawing_code() -> None:
    import subprocess
    import sys

    code = ("import sys, convscope.methods.results, convscope.methods.gradcam, convscope.methods.occlusion;"
            "print(any(m.startswith(('convscope.render', 'matplotlib', 'PIL.ImageDraw')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_convscope_render_is_reachable_lazily() -> None:
    import subprocess
    import sys

    code = "import convscope; print(convscope.render.views.render.__name__, convscope.render.figures.MIN_SIDE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["render", "224"]


def test_small_input_activation_picture_is_enlarged(photo) -> None:
    from convscope.render.pictures import activation_figure, display_image

    model = convscope.load_model("alexnet_mnist", weights="random")
    x = model.preprocess.to_tensor(photo)
    assert x.shape[-2:] == (28, 28)
    maps = convscope.activation_maps(model, x)
    picture = activation_figure(display_image(model.preprocess, x), maps, maps.layers[0], model=model)
    # the map itself (not just the caption around it) is at least 224 x 224: count the rows
    # that hold a run of >= 224 non-white pixels
    dense_rows = ((picture < 250).any(axis=2).sum(axis=1) >= 224).sum()
    assert dense_rows >= 224, dense_rows
    assert maps.to_image(x, model=model).width >= 224


def test_caption_names_model_layer_class_and_warns_on_random_weights() -> None:
    class Model:
        name, weights, stages = "alexnet", "random (seed 3)", {"conv5": "features.11"}

    lines = caption_lines(model=Model(), layer="conv5", label="tiger cat", class_index=282, probability=0.25)
    text = caption_text("Grad-CAM", lines)
    assert "alexnet, random (seed 3) weights" in text
    assert "layer: conv5 (features.11)" in text
    assert "class: tiger cat (282), p = 0.250" in text
    assert RANDOM_WEIGHTS_NOTE in text
    assert [line.warning for line in lines].count(True) == 1 and lines[-1].warning
    trained = caption_text("x", caption_lines(model=ModelInfo("efficientnet_lite0", "pretrained (pkg)")))
    assert RANDOM_WEIGHTS_NOTE not in trained
    assert "logit 3.5" in caption_text("x", caption_lines(label="cat", score=3.5))


def test_figure_adds_a_caption_band_and_a_colour_bar() -> None:
    raw = np.full((224, 224, 3), 255, np.uint8)  # all background: any ink comes from the figure
    lines = caption_lines(model=ModelInfo("tiny", "random (seed 0)"), layer="conv1")
    picture = figures.figure(raw, "Activation map", lines, figures.Bar(0.0, 2.5, "mean activation"))
    assert picture.shape[0] > raw.shape[0] + 40
    top = picture[: picture.shape[0] - 224 - 40]
    assert (top < 200).any(), "caption band has no text"
    assert (np.abs(top.astype(int) - [190, 20, 20]).sum(axis=2) < 60).any(), "random-weights warning not red"
    no_bar = figures.figure(raw, "Activation map", lines)
    bar = picture[no_bar.shape[0] - figures.MARGIN:]
    colours = bar.reshape(-1, 3)
    assert len({tuple(c) for c in colours[(colours.max(1) - colours.min(1)) > 100]}) > 50, "no colour ramp"


def test_colour_bar_ticks_show_the_real_range() -> None:
    assert figures._ticks(0.0, 2.0, 5) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert figures._fmt(0.000123) == "0.00012"


def test_small_kernels_are_enlarged_with_labels_outside(tiny) -> None:
    from convscope.render.pictures import filter_figure

    filters = convscope.conv_filters(tiny)
    kernel = filters.weights.shape[-1]
    grid = figures.labelled_grid([np.zeros((kernel, kernel, 3), np.uint8)] * 4, ["0", "1", "2", "3"], columns=4)
    # each tile: a black square of at least 48 px, untouched by its label
    black_rows = (grid == 0).all(axis=2).sum(axis=0)
    assert black_rows.max() >= 48
    figure = filter_figure(filters, model=tiny)
    assert figure.shape[1] >= 300


def test_deconv_grid_tiles_are_equal(tiny, batch) -> None:
    from convscope.render.pictures import deconv_pairs, display_image

    result = convscope.deconv(tiny, batch, list(tiny.stages)[-1], top=4)
    pairs, labels = deconv_pairs(display_image(tiny.preprocess, batch), result)
    assert len({p.shape for p in pairs}) == 1
    assert labels[0].startswith(f"ch {int(result.channels[0, 0])}: ")


def test_signed_display_is_zero_centred_and_percentile_clipped() -> None:
    from convscope.render.pictures import signed_picture, signed_scale

    values = torch.zeros(3, 20, 20)
    values[0, :10] = 1.0
    values[0, 10:] = -1.0
    values[1, 0, 0] = 1000.0  # one outlier must not wash the rest out
    assert signed_scale(values) == pytest.approx(1.0)
    picture = signed_picture(values)
    assert picture[15, 5, 1] == 128  # zero -> mid-grey
    assert picture[5, 5, 0] == 255 and picture[15, 5, 0] == 0


def test_training_pictures_are_wide_and_uncut() -> None:
    from convscope.render.training import filters_evolution_picture

    class Snap:
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch
            self.filters = torch.rand(8, 1, 3, 3)
            self.strongest_input = torch.zeros(8, dtype=torch.int64)

    assert filters_evolution_picture([Snap(1), Snap(2)]).shape[1] >= 600


def test_explain_writes_one_panel_per_image(tmp_path, photo) -> None:
    from typer.testing import CliRunner

    from convscope.cli.main import app

    for name in ("a.png", "b.png"):
        photo.save(tmp_path / name)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", "tiny",
                                      "--weights", "random", "--window", "8", "--stride", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a_explain.png", "b_explain.png", "explain.json", "manifest.json"]
    panel = Image.open(out / "a_explain.png")
    assert panel.mode == "RGB" and panel.width >= 6 * 224 and panel.height >= 224
    record = json.loads((out / "explain.json").read_text())[0]
    assert record["gradcam"] == {"layer": "conv2", "module": "features.4"}
    assert len(record["top5"]) == 5 and record["file"] == "a_explain.png"
    assert "99.5th percentile" in record["display"]["guided_gradcam"]
