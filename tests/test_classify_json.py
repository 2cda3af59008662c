"""``convscope classify --json`` draws nothing it does not write, and the pretrained EfficientNet-Lite0
run through the CLI's batches (the fused inference copy) gives the model's own probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import skimage_photo
from PIL import Image
from typer.testing import CliRunner

from convscope.cli import methods_cmd
from convscope.cli.main import app

runner = CliRunner()
TINY = ["--model", "tiny", "--weights", "random"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        path = folder / f"{name}.png"
        Image.open(skimage_photo(f"{name}.png")).convert("RGB").save(path)
        paths.append(path)
    return paths


def _counting_photo_of(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    drawn: list[int] = []
    original = methods_cmd.photo_of

    def photo_of(loaded, batch, index):  # type: ignore[no-untyped-def]
        drawn.append(index)
        return original(loaded, batch, index)

    monkeypatch.setattr(methods_cmd, "photo_of", photo_of)
    return drawn


def test_classify_without_an_output_folder_draws_no_photo(photos, monkeypatch) -> None:
    from convscope.render import views

    drawn = _counting_photo_of(monkeypatch)
    charts: list[int] = []
    chart = views.prediction_picture
    monkeypatch.setattr(views, "prediction_picture", lambda *a, **k: charts.append(1) or chart(*a, **k))
    result = runner.invoke(app, ["classify", *map(str, photos), "--json", "--topk", "2", "-b", "2", *TINY])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["image"] for r in records] == [str(p) for p in photos]
    assert all(len(r["predictions"]) == 2 for r in records)
    assert drawn == []
    plain = runner.invoke(app, ["classify", str(photos[0]), "--topk", "2", *TINY])
    assert plain.exit_code == 0 and str(photos[0]) in plain.stdout and drawn == []
    assert charts == []  # nor the bar chart no file would hold


def test_a_command_that_writes_pictures_still_draws_the_photo(photos, monkeypatch, tmp_path) -> None:
    drawn = _counting_photo_of(monkeypatch)
    result = runner.invoke(app, ["gradcam", str(photos[0]), "-o", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.output
    assert drawn == [0]


def test_classify_json_batches_equal_the_unfolded_model(photos, default_model) -> None:
    result = runner.invoke(app, ["classify", *map(str, photos), "--json", "--topk", "1000", "-b", "2"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    loaded = default_model
    batch = loaded.preprocess.to_tensor([loaded.preprocess.load_image(p) for p in photos])
    with torch.no_grad():
        reference = torch.softmax(loaded.module.eval()(batch), dim=1)
    for record, expected in zip(records, reference, strict=True):
        ours = torch.zeros(1000)
        for entry in record["predictions"]:
            ours[entry["index"]] = entry["probability"]
        assert float((ours - expected).abs().max()) < 1e-5
        assert record["predictions"][0]["index"] == int(expected.argmax())
