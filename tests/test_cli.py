"""The command line: results, JSON, one-line errors with exit code 2, batches that continue."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import skimage_photo
from PIL import Image
from typer.testing import CliRunner

from convscope.cli.main import app
from convscope.models.load import load_model

runner = CliRunner()
TINY = ["--model", "tiny", "--weights", "random"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Good and bad image files of every kind the spec lists."""
    folder = tmp_path_factory.mktemp("images")
    cat = Image.open(skimage_photo("chelsea.png")).convert("RGB")
    made = {"good": folder / "good.png"}
    cat.save(made["good"])
    made["empty"] = folder / "empty.jpg"
    made["empty"].write_bytes(b"")
    made["text"] = folder / "notes.jpg"
    made["text"].write_text("this is not an image\n")
    buffer = folder / "full.jpg"
    cat.save(buffer, quality=90)
    made["truncated_jpeg"] = folder / "truncated.jpg"
    made["truncated_jpeg"].write_bytes(buffer.read_bytes()[:2000])
    made["truncated_png"] = folder / "truncated.png"
    made["truncated_png"].write_bytes(made["good"].read_bytes()[:3000])
    made["bomb"] = folder / "bomb.png"
    Image.new("1", (30000, 30000)).save(made["bomb"])  # ~100 KB on disk, 900 Mpx decoded
    made["gray"] = folder / "gray.png"
    cat.convert("L").save(made["gray"])
    made["rgba"] = folder / "rgba.png"
    cat.convert("RGBA").save(made["rgba"])
    made["palette"] = folder / "palette.png"
    cat.convert("P").save(made["palette"])
    made["sixteen"] = folder / "sixteen.png"
    Image.fromarray(np.asarray(cat.convert("L"), np.uint16) * 257).save(made["sixteen"])
    made["cmyk"] = folder / "cmyk.jpg"
    cat.convert("CMYK").save(made["cmyk"])
    made["exif"] = folder / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    cat.save(made["exif"], exif=exif)
    return made


def test_classify_default_model_prints_the_class(images) -> None:
    result = run("classify", images["good"], "--topk", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(images["good"])
    assert any(cat in lines[1] for cat in ("tabby", "tiger cat", "Egyptian cat"))
    assert len(lines) == 4


def test_classify_json_shape(images) -> None:
    result = run("classify", images["good"], images["gray"], "--topk", "2", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [entry["image"] for entry in payload] == [str(images["good"]), str(images["gray"])]
    first = payload[0]["predictions"]
    assert len(first) == 2 and set(first[0]) == {"index", "label", "probability"}
    assert first[0]["probability"] >= first[1]["probability"]


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "empty file"),
        ("text", "not an image"),
        ("truncated_jpeg", "truncated or corrupt"),
        ("truncated_png", "truncated or corrupt"),
        ("bomb", "30000x30000"),
    ],
)
def test_bad_image_is_one_line_error(images, kind: str, reason: str) -> None:
    result = run("classify", images[kind], *TINY)
    assert_one_line_error(result, f"error: {images[kind]}: ")
    assert reason in result.stderr


def test_missing_file(tmp_path) -> None:
    result = run("classify", tmp_path / "nope.jpg", *TINY)
    assert_one_line_error(result, f"error: {tmp_path / 'nope.jpg'}: no such file")


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette", "sixteen", "cmyk", "exif"])
def test_unusual_but_valid_images_are_handled(images, kind: str) -> None:
    result = run("classify", images[kind], "--topk", "1", "--json")
    assert result.exit_code == 0, result.output
    label = json.loads(result.stdout)[0]["predictions"][0]["label"]
    if kind in ("rgba", "palette", "cmyk", "exif"):  # colour survives: still a cat
        assert label in ("tabby", "tiger cat", "Egyptian cat", "lynx", "Persian cat"), label


def test_batch_continues_past_bad_files(images) -> None:
    result = run("classify", images["good"], images["text"], images["empty"], images["gray"], "--json", *TINY)
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert [("error" in e) for e in payload] == [False, True, True, False]
    assert payload[1]["error"].startswith("not an image")
    errors = [line for line in result.stderr.splitlines() if line]
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)


def test_folder_is_expanded_in_order(images) -> None:
    result = run("classify", images["good"].parent, "--json", "--topk", "1", *TINY)
    payload = json.loads(result.stdout)
    names = [Path(e["image"]).name for e in payload]
    assert names == sorted(names)
    assert "good.png" in names and "notes.jpg" in names


def test_unknown_model() -> None:
    result = run("summary", "--model", "alexnett")
    assert_one_line_error(result, "error: alexnett: unknown model (did you mean: alexnet")


def test_unknown_layer_lists_valid_ones(images, tmp_path) -> None:
    result = run("activations", images["good"], "--layers", "conv7", "-o", tmp_path, *TINY)
    assert_one_line_error(result, "error: conv7: no such layer in tiny")
    assert "aliases: conv1, conv2" in result.stderr


def test_weights_for_the_wrong_architecture(tmp_path, images) -> None:
    torch.save(load_model("tiny", weights="random").module.state_dict(), tmp_path / "tiny.pth")
    result = run("classify", images["good"], "--model", "zfnet_cifar", "--weights", tmp_path / "tiny.pth")
    assert_one_line_error(result, "does not fit model 'zfnet_cifar'; missing keys: ")
    assert "unexpected keys: " in result.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo hacked > /tmp/convscope-cli-pwned",))


def test_pickle_that_would_run_code(tmp_path, images) -> None:
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": _Payload()}))
    result = run("classify", images["good"], "--model", "tiny", "--weights", evil)
    assert_one_line_error(result, "refused to load")
    assert not Path("/tmp/convscope-cli-pwned").exists()


def test_summary_json_and_text() -> None:
    result = run("summary", "--model", "alexnet", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["total_params"] == 61_100_840
    conv5 = next(l for l in payload["layers"] if l["name"] == "features.10")
    assert {"name", "type", "output_shape", "params", "receptive_field"} <= set(conv5)
    assert conv5["receptive_field"]["size"] == 163 and conv5["output_shape"] == [1, 256, 13, 13]
    text = run("summary", "--model", "zfnet")
    assert "features.12" in text.stdout and "139" in text.stdout and "total params: 62,357,608" in text.stdout
    bad = run("summary", "--model", "tiny", "--input-size", "3,a,4")
    assert_one_line_error(bad, "--input-size: expected C,H,W integers")


def test_layers_lists_aliases() -> None:
    result = run("layers", "--model", "alexnet", "--json")
    rows = json.loads(result.stdout)
    conv1 = next(r for r in rows if r["alias"] == "conv1")
    assert conv1["name"] == "features.1" and conv1["output_shape"] == [1, 64, 55, 55]


def test_activations_features_filters_write_pngs(images, tmp_path) -> None:
    out = tmp_path / "out"
    assert run("activations", images["good"], "-o", out, *TINY).exit_code == 0
    assert run("features", images["good"], "--layer", "conv2", "--max", "8", "-o", out, *TINY).exit_code == 0
    assert run("filters", "-o", out, *TINY).exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    assert {"good_conv1.png", "good_conv2.png", "good_activations.png", "good_features_conv2.png",
            "filters_features.0.png", "manifest.json"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    picture = Image.open(out / "good_conv1.png")  # captioned, enlarged to at least 224 px
    assert picture.mode == "RGB" and min(picture.size) >= 224
    raw = tmp_path / "raw"
    assert run("activations", images["good"], "--raw", "-o", raw, *TINY).exit_code == 0
    assert Image.open(raw / "good_conv1.png").size == (32, 32)


def test_bad_device() -> None:
    result = run("summary", "--model", "tiny", "--device", "tpu")
    assert_one_line_error(result, "--device tpu: not a device")


def test_demo_end_to_end_as_a_subprocess(tmp_path) -> None:
    """The real console entry point: exit codes and stderr as a user sees them."""
    out = tmp_path / "demo"
    env = {**os.environ, "CONVSCOPE_DEBUG": "0"}
    done = subprocess.run([sys.executable, "-m", "convscope", "demo", "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Egyptian cat" in done.stdout or "tabby" in done.stdout or "tiger cat" in done.stdout
    files = {p.name for p in out.iterdir()}
    assert {"classification.json", "summary.txt", "activations.png", "filters.png", "manifest.json"} <= files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and "activations.png" in manifest["files"]
    bad = subprocess.run([sys.executable, "-m", "convscope", "classify", str(tmp_path / "missing.png")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'missing.png'}: no such file"
