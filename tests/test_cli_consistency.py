"""CLI consistency: stage aliases for filters, one --layer spelling, label suggestions, plurals,
layer names in JSON, help at 80 columns, and approximate occlusion falling back to exact."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import skimage_photo
from PIL import Image
from typer.testing import CliRunner

import convscope
from convscope.cli.common import reflow_help
from convscope.cli.main import app
from convscope.cli.options import plural

runner = CliRunner()
TINY = ["--model", "tiny", "--weights", "random"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cat(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.open(skimage_photo("chelsea.png")).convert("RGB").save(path)
    return path


def test_filters_stage_alias_on_alexnet(tmp_path) -> None:
    result = run("filters", "--model", "alexnet", "--weights", "random", "--layer", "conv2", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["options"]["layer"] == "conv2"
    assert manifest["options"]["module"] == "features.3"  # conv2's ReLU is features.4
    picture = Image.open(tmp_path / "filters_features.3.png")
    assert picture.width >= 300 and picture.mode == "RGB"


def test_stage_alias_resolves_to_the_stage_convolution() -> None:
    model = convscope.load_model("efficientnet_lite0", weights="random")
    assert convscope.conv_filters(model, layer="stage3").layer == "features.3.1.project.conv"
    resnet = convscope.load_model("resnet18", weights="random")
    assert convscope.conv_filters(resnet, layer="stage3").layer == "layer3.1.conv2"
    # a module path that is not a convolution is still an error (no guessing for paths)
    with pytest.raises(convscope.ConvscopeError, match="not a Conv2d"):
        convscope.conv_filters(resnet, layer="layer3")


def test_activations_take_layer_and_the_hidden_old_spelling(tmp_path, cat) -> None:
    new = run("activations", cat, *TINY, "--layer", "conv2", "-o", tmp_path / "new")
    old = run("activations", cat, *TINY, "--layers", "conv2", "-o", tmp_path / "old")
    assert new.exit_code == 0 and old.exit_code == 0, (new.output, old.output)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.name for p in (tmp_path / "old").iterdir())
    assert "cat_conv2.png" in {p.name for p in (tmp_path / "new").iterdir()}
    assert "--layers" not in run("activations", "--help").output


def test_label_suggestions_prefer_labels_containing_the_word() -> None:
    from convscope.methods.targets import label_suggestions
    from convscope.models.labels import get_labels

    hint = label_suggestions("cat", get_labels("imagenet"))
    assert hint.startswith("did you mean: ")
    names = hint.removeprefix("did you mean: ").split(" (and ")[0].split(", ")
    assert "tiger cat" in names and "Egyptian cat" in names
    assert names.index("tiger cat") < names.index("oystercatcher")  # whole word before substring
    assert "tabby" in label_suggestions("tabyy", get_labels("imagenet"))  # spelling still helps


def test_unknown_label_error_suggests_tiger_cat(cat) -> None:
    result = run("gradcam", cat, "--model", "efficientnet_lite0", "--weights", "random", "--label", "cat")
    assert result.exit_code == 2
    assert "tiger cat" in result.stderr and "error: --label cat" in result.stderr


def test_singular_and_plural(tmp_path, cat) -> None:
    assert plural(1, "picture") == "1 picture" and plural(2, "picture") == "2 pictures"
    assert plural(0, "file") == "0 files"
    result = run("features", cat, *TINY, "--layer", "conv1", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert "wrote 1 picture to" in result.output


def test_layer_named_the_same_in_every_json(tmp_path, cat) -> None:
    result = run("gradcam", cat, *TINY, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "gradcam.json").read_text())[0]
    options = json.loads((tmp_path / "manifest.json").read_text())["options"]
    assert (record["layer"], record["module"]) == (options["layer"], options["module"]) == ("conv2", "features.4")
    assert 0.0 <= record["probability"] <= 1.0


def test_help_fits_80_columns_without_broken_sentences() -> None:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    for command in ("occlusion", "gradcam", "activations", "filters"):
        out = subprocess.run([sys.executable, "-m", "convscope", command, "--help"], capture_output=True,
                             text=True, env=env, check=True).stdout
        assert max(len(line) for line in out.splitlines()) <= 80, command
        assert "…" not in out, command
    occlusion_help = subprocess.run([sys.executable, "-m", "convscope", "occlusion", "--help"],
                                    capture_output=True, text=True, env=env, check=True).stdout
    # The docstring's hard line breaks used to end lines mid-sentence ("... with the square at
    # each" / "position, over the photo"): inside a paragraph, only its last line may be short.
    paragraphs: list[list[str]] = [[]]
    prose = re.split(r"╭|\n(?:Arguments|Options):", occlusion_help)[0]  # rich (TTY) or plain (pipe) layout
    for line in prose.splitlines():
        if line.strip():
            paragraphs[-1].append(line.strip())
        else:
            paragraphs.append([])
    for lines in paragraphs:
        for line in lines[:-1]:
            assert len(line) >= 50 or line.startswith(("convscope", "Usage", "Example")), line


def test_reflow_joins_paragraph_lines_and_splits_examples() -> None:
    text = reflow_help("Title line\ncontinued.\n\nExamples: a --x | b \\\n  --y\n(comment)")
    assert text == "Title line continued.\n\n\b\nExamples:\n  a --x\n  b --y (comment)"


def test_approximate_falls_back_to_exact_when_not_faster(monkeypatch) -> None:
    from convscope.methods.occlusion import precision

    model = convscope.load_model("tiny", weights="random")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = convscope.occlusion(model, x, window=8, stride=8)
    monkeypatch.setattr(precision, "low_precision", lambda device: torch.bfloat16)
    monkeypatch.setattr(precision, "speedup", lambda *args: 0.8)
    slow = convscope.occlusion(model, x, window=8, stride=8, mode="approximate")
    assert slow.stats.precision == "float32"
    assert "bfloat16 measured 0.80x" in slow.stats.fallback and "ran exact" in slow.stats.fallback
    assert torch.equal(slow.probability, exact.probability)
    monkeypatch.setattr(precision, "speedup", lambda *args: 3.0)
    fast = convscope.occlusion(model, x, window=8, stride=8, mode="approximate")
    assert fast.stats.precision == "bfloat16" and fast.stats.fallback == ""
    monkeypatch.setattr(precision, "low_precision", lambda device: None)
    none = convscope.occlusion(model, x, window=8, stride=8, mode="approximate")
    assert "no fast bfloat16" in none.stats.fallback and none.stats.precision == "float32"
    assert exact.stats.fallback == ""
