"""``convscope atlas`` end to end: the folder and atlas.json as docs/atlas-format.md documents them,
statistics and classes equal to a direct computation, kill -9 and --resume, torchrun, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_patches_cli import convscope, run_env, write_idx

from convscope.dataset.atlas import chunks_of, class_counts, state_names
from convscope.dataset.patches import top_patches
from convscope.dataset.sources import open_source
from convscope.models.load import load_model

BASE = ["atlas", "fashion-mnist", "--model", "zfnet_mnist", "--weights", "random", "--seed", "1",
        "--layer", "conv1", "--layer", "conv4", "--channels", "0-4", "--device", "cpu", "-b", "32"]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of an atlas folder but the manifest (it records timings), by relative path."""
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "manifest.json"}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = write_idx(tmp_path_factory.mktemp("fm"), 300)
    labels = torch.arange(300) % 10
    (folder / "train-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01" + (300).to_bytes(4, "big") + bytes(labels.tolist()))
    return folder, run_env(folder)


@pytest.fixture(scope="module")
def atlas(fashion, tmp_path_factory) -> Path:
    _, env = fashion
    out = tmp_path_factory.mktemp("atlas") / "out"
    run = convscope([*BASE, "--featurevis-steps", "6", "--featurevis-batch", "3", "-o", str(out)], env)
    assert run.returncode == 0, run.stderr
    assert "atlas of 10 units over 300 images" in run.stdout
    return out


def test_atlas_json_follows_the_documented_format(atlas) -> None:
    document = json.loads((atlas / "atlas.json").read_text())
    assert document["format"] == "convscope-atlas" and document["version"] == 1
    assert document["model"] == "zfnet_mnist" and document["images"] == 300 and document["classes"] == "dataset"
    assert document["featurevis"]["steps"] == 6 and document["featurevis"]["size"] == 28
    assert document["relevance"] == {"target": "predicted", "composite": "epsilon-plus-flat"}
    assert [layer["name"] for layer in document["layers"]] == ["conv1", "conv4"]
    documented = (Path(__file__).parents[1] / "docs" / "atlas-format.md").read_text()
    # Every key the command writes is in the documented format (its example document).
    def keys(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from keys(item)
        elif isinstance(value, list):
            for item in value:
                yield from keys(item)

    undocumented = {key for key in keys(document) if f'"{key}"' not in documented}
    assert not undocumented, undocumented
    for layer in document["layers"]:
        assert layer["path"].startswith("features.") and layer["channels"] >= 5
        assert (atlas / layer["page"]).is_file()
        assert [unit["unit"] for unit in layer["units"]] == [0, 1, 2, 3, 4]
        for unit in layer["units"]:
            assert set(unit) >= {"unit", "page", "featurevis", "negative", "objective", "negative_objective",
                                 "stats", "patches", "relevance_patches"}
            assert set(unit["stats"]) == {"mean", "max", "firing", "classes"}
            assert len(unit["patches"]) == 9 and len(unit["relevance_patches"]) == 9
            named = [unit["page"], unit["featurevis"], unit["negative"]] + [
                entry[key] for entry in unit["patches"] + unit["relevance_patches"] for key in ("crop", "projection")]
            for relative in named:
                assert not relative.startswith("/") and ".." not in relative
                assert (atlas / relative).is_file(), relative
            values = [entry["value"] for entry in unit["patches"]]
            assert values == sorted(values, reverse=True)
    assert (atlas / document["site"]).is_file()
    manifest = json.loads((atlas / "manifest.json").read_text())
    assert manifest["command"] == "atlas" and "atlas.json" in manifest["files"]
    assert set(manifest["options"]["timings"]) == {"mining_seconds", "relevance_seconds", "featurevis_seconds",
                                                  "drawing_seconds"}
    assert not (atlas / ".atlas-state").exists() and not (atlas / ".atlas-relevance-state").exists()


def test_statistics_classes_and_patches_equal_the_library(atlas, fashion) -> None:
    folder, _ = fashion
    document = json.loads((atlas / "atlas.json").read_text())
    os.environ["CONVSCOPE_FASHION_MNIST"] = str(folder)
    try:
        model = load_model("zfnet_mnist", "random", seed=1)
        source = open_source("fashion-mnist", model.preprocess)
        index = top_patches(model, source, ["conv1", "conv4"], channels=[0, 1, 2, 3, 4], statistics=True,
                            batch_size=32)
        labels = source.labels()
    finally:
        del os.environ["CONVSCOPE_FASHION_MNIST"]
    assert labels == [i % 10 for i in range(300)]
    for layer in document["layers"]:
        for slot, unit in enumerate(layer["units"]):
            expected = index.statistics[layer["name"]][slot]
            for key in ("mean", "max", "firing"):
                assert unit["stats"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12)
            entries = index.layers[layer["name"]][slot]
            assert [e["index"] for e in unit["patches"]] == [e.index for e in entries]
            assert [e["box"] for e in unit["patches"]] == [list(e.box) for e in entries]
            # The classes of the top images are the dataset's labels (position % 10 here), counted.
            counted = class_counts([e.index for e in entries], {p: p % 10 for p in range(300)}, model.categories)
            assert unit["stats"]["classes"] == counted
            assert sum(row["count"] for row in counted) == 9
            assert counted[0]["label"] == model.categories[counted[0]["class"]]


def test_class_counts_order_and_limit() -> None:
    classes = {0: 3, 1: 3, 2: 1, 3: 1, 4: 7, 5: 2}
    rows = class_counts([0, 1, 2, 3, 4, 5], classes, ["a", "b", "c"], limit=3)
    assert rows == [{"class": 1, "count": 2, "label": "b"}, {"class": 3, "count": 2}, {"class": 2, "count": 1,
                                                                                      "label": "c"}]


def test_chunks_and_state_names() -> None:
    assert chunks_of([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert state_names([[0, 1, 2], [5]], 2) == [
        "featurevis-0-featurevis-0.pt", "featurevis-0-featurevis-1.pt", "featurevis-0-negative-0.pt",
        "featurevis-0-negative-1.pt", "featurevis-1-featurevis-0.pt", "featurevis-1-negative-0.pt"]


def test_refusals_are_one_line(fashion, tmp_path) -> None:
    _, env = fashion
    for extra, words in ((["--composite", "nosuch"], "unknown composite"),
                         (["--no-relevance", "--composite", "epsilon-plus-flat"], "needs the relevance ranking"),
                         (["--channels", "9-2"], "runs backwards")):
        run = convscope([*BASE, *extra, "-o", str(tmp_path / "x")], env)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("error: ") and words in run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    # A user's folder of the state's name is refused before any work and left as it is.
    out = tmp_path / "mine"
    (out / ".atlas-state").mkdir(parents=True)
    (out / ".atlas-state" / "notes.txt").write_text("mine")
    run = convscope([*BASE, "--featurevis-steps", "2", "-o", str(out)], env)
    assert run.returncode == 2 and "was not made by convscope" in run.stderr
    assert (out / ".atlas-state" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [".atlas-state"]


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(fashion, atlas, tmp_path) -> None:
    _, env = fashion
    args = [*BASE, "--featurevis-steps", "6", "--featurevis-batch", "3", "--checkpoint-every", "2"]
    out = tmp_path / "killed"
    chunk = out / ".atlas-state" / "featurevis-0-featurevis-0.pt"
    process = subprocess.Popen([sys.executable, "-m", "convscope", *args, "-o", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not chunk.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    assert not (out / "atlas.json").exists()
    resumed = convscope([*args, "-o", str(out), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert files_of(out) == files_of(atlas)
    # A chunk made with other settings is refused on resume, in one line.
    again = tmp_path / "again"
    first = subprocess.Popen([sys.executable, "-m", "convscope", *args, "-o", str(again)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunk = again / ".atlas-state" / "featurevis-0-featurevis-0.pt"
    deadline = time.monotonic() + 300
    while not chunk.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    other = convscope([*BASE, "--featurevis-steps", "7", "--featurevis-batch", "3", "-o", str(again), "--resume"],
                      env)
    assert chunk.exists()
    assert other.returncode == 2 and "other feature visualisation settings" in other.stderr, other.stderr


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(fashion, atlas, tmp_path) -> None:
    _, env = fashion
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "convscope", *BASE, "--featurevis-steps", "6", "--featurevis-batch", "3", "-o", str(out)]
    run = subprocess.run(launcher, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert files_of(out) == files_of(atlas)
    assert json.loads((out / "manifest.json").read_text())["options"]["processes"] == 2
