"""Every surface on a model convscope did not build: ``--model torchvision:regnet_y_400mf --weights
random`` through gradcam, occlusion (its exact fallback: RegNet's squeeze-excite), explore,
patches, the web app's ``/api/explain``, and ``layers`` showing the measured layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convscope.cli.main import app

pytest.importorskip("torchvision")
runner = CliRunner()
MODEL = ["--model", "torchvision:regnet_y_400mf", "--weights", "random"]


def _run(*args: object) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def photo_path() -> Path:
    import skimage

    return Path(skimage.data_dir) / "chelsea.png"


@pytest.mark.slow
def test_gradcam_and_occlusion_run_and_say_what_they_did(photo_path: Path, tmp_path: Path) -> None:
    _run("gradcam", photo_path, *MODEL, "-o", tmp_path / "cam")
    record = json.loads((tmp_path / "cam" / "gradcam.json").read_text())[0]
    assert record["module"] == "trunk_output" and record["layout"] == "NCHW" and record["converted"] is None
    result = _run("occlusion", photo_path, *MODEL, "--window", 112, "--stride", 112, "-o", tmp_path / "occ")
    assert "note: incremental occlusion does not fit this model" in result.output  # type: ignore[attr-defined]
    occlusion = json.loads((tmp_path / "occ" / "occlusion.json").read_text())[0]
    assert occlusion["note"] and occlusion["grid"] == [2, 2]


@pytest.mark.slow
def test_explore_and_patches(photo_path: Path, tmp_path: Path) -> None:
    _run("explore", photo_path, *MODEL, "-o", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "torchvision:regnet_y_400mf" in page and "Grad-CAM" in page
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(photo_path.read_bytes())
    _run("patches", photos, *MODEL, "--layer", "stage3", "--channels", "0-3", "--top", 2, "--no-projections",
         "-o", tmp_path / "patches")
    mined = json.loads((tmp_path / "patches" / "patches.json").read_text())
    assert mined["model"] == "torchvision:regnet_y_400mf" and mined["channels"] == {"stage3": [0, 1, 2, 3]}
    for entries in mined["layers"]["stage3"]:
        assert len(entries) == 2
        for entry in entries:  # boxes inside the 224-pixel input, well ordered
            x0, y0, x1, y1 = entry["box"]
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224


def test_layers_shows_measured_layouts() -> None:
    result = _run("layers", "--model", "torchvision:convnext_tiny", "--weights", "random")
    lines = {line.split()[0]: line.split()[-1] for line in result.output.splitlines()[1:] if line.strip()}  # type: ignore[attr-defined]
    assert lines["features.1.0.block.3"] == "NHWC" and lines["features.1.0.block.0"] == "NCHW"
    assert lines["classifier.2"] == "vector"


@pytest.mark.slow
def test_web_explain_on_a_torchvision_model(photo_path: Path) -> None:
    from fastapi.testclient import TestClient

    from convscope.web.app import create_app

    with TestClient(create_app(model="torchvision:regnet_y_400mf", weights="random")) as client:
        described = client.get("/api/model")
        assert described.status_code == 200, described.text
        assert described.json()["cam_layer"] == "trunk_output"
        assert {"name": "trunk_output", "layout": "NCHW"}.items() <= next(
            layer for layer in described.json()["layers"] if layer["name"] == "trunk_output").items()
        response = client.post("/api/explain", data={"method": "gradcam"},
                               files={"image": ("chelsea.png", photo_path.read_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png" and response.content[:4] == b"\x89PNG"
