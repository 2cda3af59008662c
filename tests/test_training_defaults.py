"""Training and evaluation defaults: evaluating on a run's own folder, extending a run with
``--resume --epochs N``, and the grayscale note for photos fed to a 1-channel model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import shapes_folder
from PIL import Image
from typer.testing import CliRunner

from convscope.models.load import load_model
from convscope.training import TrainConfig, train
from convscope.training.batches import BatchTransform
from convscope.training.data import load_training_data
from convscope.training.evaluate import evaluate
from convscope.training.schedule import learning_rate


@pytest.fixture(scope="module")
def cli():
    import convscope.cli.train_cmd  # noqa: F401  (registers train/evaluate)
    from convscope.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])



@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory):
    """One epoch of zfnet_mnist on a flat class folder (default 20 % held out: 2 of 12 per class)."""
    root = tmp_path_factory.mktemp("own")
    folder = shapes_folder(root / "shapes")
    result = train(TrainConfig(data=str(folder), out_dir=str(root / "run"), arch="zfnet_mnist", epochs=1, batch_size=8))
    return folder, result


# -- evaluate on the run's own folder ------------------------------------------------------------------


def test_evaluate_own_folder_scores_the_held_out_split(cli, folder_run, tmp_path: Path) -> None:
    folder, run = folder_run
    out = tmp_path / "eval"
    done = cli("evaluate", "--weights", run.best_checkpoint, "--data", folder, "-o", out)
    assert done.exit_code == 0, done.output
    assert "note: " in done.output and "held-out split (6 images" in done.output
    assert "warning:" not in done.output
    assert "val: 6 images" in done.output
    payload = json.loads((out / "evaluation.json").read_text())
    assert payload["count"] == 6 and payload["split"] == "val"
    assert payload["includes_training_images"] is False and "held-out" in payload["note"]

    # Exactly the images training held out (not merely six of them).
    loaded = load_model(weights=run.best_checkpoint)
    held = load_training_data(folder, preprocess=loaded.preprocess).val
    assert held is not None and run.data["splits"]["val"] == len(held) == 6
    result = evaluate(run.best_checkpoint, str(folder))
    assert result.count == 6
    with torch.no_grad():
        logits = loaded.module.eval()(BatchTransform(loaded.preprocess)(held.images))
    expected = float((logits.argmax(1) == held.labels).float().mean())
    assert result.accuracy == pytest.approx(expected)


def test_evaluate_other_folder_scores_every_image(cli, folder_run, tmp_path: Path) -> None:
    folder, run = folder_run
    copy = shutil.copytree(folder, tmp_path / "copy")
    done = cli("evaluate", "--weights", run.best_checkpoint, "--data", copy)
    assert done.exit_code == 0, done.output
    assert "all: 36 images" in done.output and "note:" not in done.output and "warning:" not in done.output


def test_evaluate_own_folder_without_held_out_split_warns(cli, tmp_path: Path) -> None:
    folder = shapes_folder(tmp_path / "shapes")
    run = tmp_path / "run"
    trained = cli("train", "--data", folder, "--arch", "zfnet_mnist", "--epochs", 1, "-b", 8, "--val-split", 0, "-o", run)
    assert trained.exit_code == 0, trained.output
    done = cli("evaluate", "--weights", run / "best.pt", "--data", folder, "--json")
    assert done.exit_code == 0, done.output
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "was trained on" in warnings[0], done.stderr
    payload = json.loads(done.stdout)
    assert payload["count"] == 36 and payload["includes_training_images"] is True


# -- train --resume --epochs N -------------------------------------------------------------------------------


def test_resume_extends_a_finished_run_and_replans_the_schedule(cli, tmp_path: Path) -> None:
    common = ["--data", "digits", "--arch", "zfnet_mnist", "--limit", 96, "-b", 24, "--seed", 3]
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert cli("train", *common, "--epochs", 2, "-o", run).exit_code == 0
    before = (run / "metrics.jsonl").read_text().splitlines()

    extended = cli("train", "-o", run, "--resume", "--epochs", 4)
    assert extended.exit_code == 0, extended.output
    assert "note: " in extended.output and "extended from epoch 2 (planned: 2) to 4 epochs" in extended.output
    assert "re-planned over 4 epochs" in extended.output and "epoch 3/4" in extended.output
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_text().splitlines()[:2] == before  # the done epochs are kept
    assert json.loads((run / "config.json").read_text())["epochs"] == 4
    assert json.loads((run / "result.json").read_text())["final"]["epoch"] == 4

    # Re-planned: epochs 3-4 get the rates of a run started with --epochs 4, not the floor of the
    # finished 2-epoch schedule, nor a fresh 2-epoch schedule.
    assert cli("train", *common, "--epochs", 4, "-o", fresh).exit_code == 0
    planned = [json.loads(line)["lr"] for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in history[2:]] == planned[2:]
    assert history[2]["lr"] > 100 * history[1]["lr"]  # a warm restart from the floor

    config = TrainConfig(data="digits", out_dir=str(run), arch="zfnet_mnist", epochs=4, lr=3e-3)
    steps = json.loads((run / "data.json").read_text())["splits"]["train"] // 24
    assert history[2]["lr"] == pytest.approx(learning_rate(config, 3 * steps - 1, 4 * steps))
    assert history[2]["lr"] != pytest.approx(learning_rate(replace(config, epochs=2), steps - 1, 2 * steps))

    shorter = cli("train", "-o", run, "--resume", "--epochs", 3)
    assert shorter.exit_code == 2
    lines = shorter.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --epochs 3: ") and "already trained 4 epochs" in lines[0]
    again = cli("train", "-o", run, "--resume", "--epochs", 4)  # the recorded plan: nothing left to do
    assert again.exit_code == 0 and "re-planned" not in again.output
    assert not [line for line in again.output.splitlines() if line.startswith("epoch ")]


def test_help_documents_the_extension(cli) -> None:
    text = " ".join(cli("train", "--help").output.split())
    assert "--resume --epochs N" in text and "re-planned over N" in text


# -- transfer to RGB photos --------------------------------------------------------------------------


def test_transfer_from_grayscale_checkpoint_to_rgb_photos_says_so(cli, tmp_path: Path) -> None:
    source = tmp_path / "source"
    first = cli("train", "--data", "digits", "--arch", "zfnet_mnist", "--epochs", 1, "--limit", 48, "-b", 24, "-o", source)
    assert first.exit_code == 0, first.output
    assert "note:" not in first.output  # digits are 1-channel already
    assert json.loads((source / "result.json").read_text())["notes"] == []

    photos = shapes_folder(tmp_path / "photos", rgb=True)
    assert Image.open(photos / "bars" / "0.png").mode == "RGB"
    run = tmp_path / "transfer"
    done = cli("train", "--data", photos, "--from", source / "best.pt", "--freeze", "features", "--epochs", 1,
               "-b", 8, "-o", run)
    assert done.exit_code == 0, done.output
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "images are converted to 1\u00d728\u00d728 grayscale" in notes[0]
    recorded = json.loads((run / "result.json").read_text())["notes"]
    assert len(recorded) == 1 and "1\u00d728\u00d728 grayscale" in recorded[0]
