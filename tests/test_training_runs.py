"""Training runs on tiny subsets: checkpoints, load_model, resume after SIGKILL, transfer, snapshots,
ablation, evaluation, and the CLI commands."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shapes_folder
from PIL import Image
from typer.testing import CliRunner

from convscope.errors import BadArgument, DataError, UnknownModel, WeightsMismatch
from convscope.models.labels import DIGITS
from convscope.models.load import load_model
from convscope.training import TrainConfig, resume, train
from convscope.training.checkpoint import CheckpointWriteError, read_checkpoint
from convscope.training.data import fashion_mnist_available
from convscope.training.evaluate import evaluate
from convscope.training.runrecord import RunFolderError

TIMING = ("images_per_second", "epoch_seconds")
# Small enough to be quick, big enough that an epoch has several steps and the model learns.
BASE = {"data": "digits", "arch": "zfnet_mnist", "epochs": 3, "limit": 240, "batch_size": 24, "seed": 7,
            "augment": ("crop", "flip", "color", "erase")}


def _strip(history: list[dict] | tuple[dict, ...]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def _metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("clean") / "run"
    return train(TrainConfig(out_dir=str(run), **BASE))


# -- a run and its files ------------------------------------------------------------------------


def test_run_folder_and_metrics(clean_run) -> None:
    run = clean_run.run_dir
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "data.json", "metrics.jsonl", "last.pt", "best.pt", "result.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    lines = _metrics_lines(run)
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert _strip(lines) == _strip(clean_run.history)
    assert set(lines[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    # The test split is never scored during training: nothing about it can steer best.pt.
    assert not [key for m in lines for key in m if key.startswith("test")]
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 3e-3 and config["weight_decay"] == 0.05 and config["augment"] == list(BASE["augment"])
    best = max(lines, key=lambda m: m["val_accuracy"])
    assert clean_run.best_epoch == best["epoch"] and clean_run.selection == "val"
    # It learned something: chance is 0.1.
    assert clean_run.test_accuracy is not None and clean_run.test_accuracy > 0.3
    result = json.loads((run / "result.json").read_text())
    assert result["selection"] == "val" and result["test"]["epoch"] == clean_run.best_epoch
    assert result["test"]["checkpoint"] == "best.pt" and result["test"]["count"] == 240
    assert result["validation"] == "10% of the training images held out per class (split seed 0)"


def test_best_checkpoint_loads_as_a_model(clean_run) -> None:
    loaded = load_model(weights=clean_run.best_checkpoint)
    assert loaded.name == "zfnet_mnist" and loaded.categories == DIGITS
    assert loaded.preprocess.input_size == (1, 28, 28)
    raw = torch.load(clean_run.best_checkpoint, weights_only=True)
    assert raw["format"] == "convscope-checkpoint" and raw["version"] == 2 and raw["role"] == "best"
    assert raw["optimizer"] is None and raw["rng"] is None and raw["epoch"] == clean_run.best_epoch
    # The test accuracy reported is best.pt's, as anyone evaluating the file gets it.
    result = evaluate(loaded, "digits", limit=240)
    assert result.accuracy == clean_run.test_accuracy
    assert int(result.confusion.sum()) == result.count == 240
    assert result.per_class.shape == (10,)
    last = read_checkpoint(clean_run.last_checkpoint)
    assert last["epoch"] == 3 and last["optimizer"] is not None and set(last["rng"]) == {"torch", "data", "numpy", "python"}


def test_training_leaves_global_state_alone(clean_run, tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    flag = torch.are_deterministic_algorithms_enabled()
    train(TrainConfig(out_dir=str(tmp_path / "r"), **{**BASE, "epochs": 1, "limit": 48}))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.are_deterministic_algorithms_enabled() == flag


# -- resume ---------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(clean_run, tmp_path: Path) -> None:
    run = tmp_path / "run"

    def stop_mid_epoch(event) -> None:  # type: ignore[no-untyped-def]
        if event.phase == "train" and event.epoch == 2 and event.step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(TrainConfig(out_dir=str(run), **BASE), stop_mid_epoch)
    assert read_checkpoint(run / "last.pt")["epoch"] == 1
    result = resume(run)
    assert result.resumed_from == 1
    assert _strip(result.history) == _strip(clean_run.history)
    assert _strip(_metrics_lines(run)) == _strip(_metrics_lines(clean_run.run_dir))
    a = torch.load(run / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(clean_run.best_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_mid_epoch_then_resume_matches_a_clean_run(clean_run, tmp_path: Path) -> None:
    """A separate process is SIGKILLed right after its first checkpoint; the resumed run's final
    metrics equal the uninterrupted run's. It also records snapshots, which must not change training."""
    run = tmp_path / "killed"
    config = dict(BASE, out_dir=str(run), snapshot_epochs=(0, 1, 3))
    script = textwrap.dedent(
        f"""
        from convscope.training import TrainConfig, train
        train(TrainConfig(**{config!r}))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (run / "last.pt").exists():
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        if process.stderr:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(run / "last.pt")["epoch"]
    assert killed_at < 3
    # A kill inside an atomic write may leave its hidden temporary file; never a partial final file.
    assert all(p.name.startswith(".") for p in run.iterdir() if p.name.endswith(".tmp"))

    result = resume(run)
    assert result.resumed_from == killed_at
    assert not [p.name for p in run.rglob("*.tmp")]
    assert _metrics_lines(run)[-1] == {**_metrics_lines(run)[-1], **_strip(_metrics_lines(clean_run.run_dir))[-1]}
    assert _strip(_metrics_lines(run)) == _strip(_metrics_lines(clean_run.run_dir))
    # Feature evolution survived the kill: all three snapshots and the side-by-side picture.
    assert sorted(p.name for p in (run / "snapshots").glob("*.pt")) == ["epoch_000.pt", "epoch_001.pt", "epoch_003.pt"]
    picture = np.asarray(Image.open(run / "evolution.png"))
    assert picture.ndim == 3 and picture.shape[1] > 3 * 48
    snapshot = torch.load(run / "snapshots" / "epoch_003.pt", weights_only=True)
    assert snapshot["layers"] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    first = torch.load(run / "snapshots" / "epoch_000.pt", weights_only=True)
    for layer in snapshot["layers"]:
        assert torch.equal(first["channels"][layer], snapshot["channels"][layer])
        assert snapshot["projections"][layer].shape == (4, 1, 28, 28)
        assert snapshot["boxes"][layer].shape == (4, 4)
    # conv1 is 3x3 at stride 1: its receptive-field boxes are 3 pixels wide (clipped at borders).
    widths = snapshot["boxes"]["conv1"][:, 3] - snapshot["boxes"]["conv1"][:, 1]
    assert set(widths.tolist()) <= {2, 3}
    assert snapshot["filters"].shape == (32, 1, 3, 3)
    assert not torch.equal(first["filters"], snapshot["filters"])


def test_resume_refusals(clean_run, tmp_path: Path) -> None:
    run = clean_run.run_dir
    with pytest.raises(RunFolderError, match=r"holds an earlier run \(run [0-9a-f]{8}, epoch 3 of 3, finished\); "
                       r"use resume=True to continue it or overwrite=True to replace it$"):
        train(TrainConfig(out_dir=str(run), **BASE))
    with pytest.raises(WeightsMismatch, match=r"last.pt: is a checkpoint of 'zfnet_mnist', not of 'alexnet_mnist'"):
        train(TrainConfig(out_dir=str(run), **{**BASE, "arch": "alexnet_mnist"}, resume=True))
    with pytest.raises(BadArgument, match=r"the run was started with other options: batch_size 16 vs 24"):
        train(TrainConfig(out_dir=str(run), **{**BASE, "batch_size": 16}, resume=True))
    with pytest.raises(BadArgument, match=r"no checkpoint to resume from"):
        train(TrainConfig(out_dir=str(tmp_path / "new"), **BASE, resume=True))


def test_disk_full_during_training_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convscope.training import checkpoint as module

    run = tmp_path / "run"
    real = module._write
    calls = {"n": 0}

    def write(handle, data):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= 3:  # epoch 1 wrote last.pt and best.pt; epoch 2's last.pt hits a full disk
            handle.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(module, "_write", write)
    with pytest.raises(CheckpointWriteError, match=r"last.pt: no space left on /\S* \(\d+ bytes needed\); the previous checkpoint is intact"):
        train(TrainConfig(out_dir=str(run), **{**BASE, "epochs": 2, "limit": 48}))
    assert read_checkpoint(run / "last.pt")["epoch"] == 1
    assert load_model(weights=run / "best.pt").name == "zfnet_mnist"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


# -- bad input ----------------------------------------------------------------------------------


def test_bad_options(tmp_path: Path) -> None:
    out = str(tmp_path / "r")
    with pytest.raises(UnknownModel, match="nonet: unknown model"):
        train(TrainConfig(data="digits", arch="nonet", out_dir=out))
    with pytest.raises(BadArgument, match="^freeze features: freezing needs learned features"):
        train(TrainConfig(data="digits", arch="zfnet_mnist", out_dir=out, freeze="features"))
    with pytest.raises(BadArgument, match=r"^snapshot_epochs 4: must be between 0 \(before training\) and epochs 3$"):
        train(TrainConfig(data="digits", arch="zfnet_mnist", out_dir=out, epochs=3, snapshot_epochs=(1, 4)))
    with pytest.raises(BadArgument, match="^optimizer rmsprop: unknown optimizer"):
        train(TrainConfig(data="digits", arch="zfnet_mnist", out_dir=out, optimizer="rmsprop"))
    with pytest.raises(DataError, match="is empty"):
        (tmp_path / "empty").mkdir()
        train(TrainConfig(data=str(tmp_path / "empty"), arch="zfnet_mnist", out_dir=out))
    assert not (tmp_path / "r" / "last.pt").exists()


# -- transfer -------------------------------------------------------------------------------------



@pytest.mark.parametrize("freeze", ["features", "all-but-last"])
def test_transfer_trains_only_the_head(clean_run, tmp_path: Path, freeze: str) -> None:
    source = torch.load(clean_run.best_checkpoint, weights_only=True)["state_dict"]
    run = tmp_path / "transfer"
    result = train(TrainConfig(
        data=str(shapes_folder(tmp_path / "shapes")), out_dir=str(run), init_from=str(clean_run.best_checkpoint),
        freeze=freeze, epochs=2, batch_size=8, augment=("crop",),
    ))
    assert result.config.arch == "zfnet_mnist" and result.selection == "val"
    after = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    trained = {"classifier.4.weight", "classifier.4.bias"}
    if freeze == "features":
        trained |= {"classifier.1.weight", "classifier.1.bias"}
    for key, value in source.items():
        if key in trained:
            continue
        assert torch.equal(after[key], value), key  # frozen weights and BatchNorm statistics, bit for bit
    assert after["classifier.4.weight"].shape == (3, 256)
    if freeze == "features":
        assert not torch.equal(after["classifier.1.weight"], source["classifier.1.weight"])
    assert result.trainable == sum(after[k].numel() for k in trained)
    loaded = load_model(weights=run / "best.pt")
    assert loaded.categories == ("bars", "blobs", "frames")
    assert loaded.module(torch.zeros(1, 1, 28, 28)).shape == (1, 3)


# -- ablation ------------------------------------------------------------------------------------


def test_ablation_table(tmp_path: Path) -> None:
    from convscope.training.ablation import ablate

    base = TrainConfig(out_dir=str(tmp_path / "abl"), **{**BASE, "epochs": 1, "limit": 96, "augment": ()})
    result = ablate(base, ["drop:conv3,conv4", "width:conv2=16"])
    assert [r.variant for r in result.rows] == ["base", "drop:conv3,conv4", "width:conv2=16"]
    params = {r.variant: r.parameters for r in result.rows}
    assert params["base"] - params["drop:conv3,conv4"] == (64 * 96 * 9 + 192) + (96 * 96 * 9 + 192) + (96 - 64) * 64 * 9
    assert params["base"] - params["width:conv2=16"] == (64 - 16) * (32 * 9 + 2 + 96 * 9)
    for row in result.rows:
        run = json.loads((Path(row.run_dir) / "result.json").read_text())
        assert row.test_error == pytest.approx(1 - run["test"]["accuracy"])
        assert row.held_out_error == pytest.approx(1 - run["best"]["val_accuracy"])
    markdown = (tmp_path / "abl" / "ablation.md").read_text()
    assert markdown.splitlines()[0].startswith("| variant | parameters | train error % | val error % | test error %")
    assert len(markdown.splitlines()) == 5
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["base", "drop:conv3,conv4", "width:conv2=16"]
    # Rerunning reuses the finished runs (same numbers, no retraining).
    again = ablate(base, ["drop:conv3,conv4", "width:conv2=16"])
    assert again.rows == result.rows
    with pytest.raises(BadArgument, match="classifier.4 is the output layer"):
        ablate(replace(base, out_dir=str(tmp_path / "bad")), ["drop:conv2", "drop:classifier.4"])
    assert not (tmp_path / "bad").exists()  # checked before anything trained


# -- real Fashion-MNIST ------------------------------------------------------------------------------


@pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)",
)
def test_fashion_mnist_short_run(tmp_path: Path) -> None:
    result = train(TrainConfig(data="fashion-mnist", arch="zfnet_mnist", out_dir=str(tmp_path / "fm"),
                               epochs=2, limit=1024, batch_size=64, augment=("crop", "flip")))
    assert result.data["splits"] == {"train": 1024, "val": 1024, "test": 1024}
    assert result.selection == "val"
    assert result.test_accuracy is not None and result.test_accuracy > 0.6  # chance is 0.1
    evaluation = evaluate(load_model(weights=result.best_checkpoint), "fashion-mnist", limit=1024)
    assert evaluation.accuracy == result.test_accuracy


# -- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    import convscope.cli.train_cmd  # noqa: F401  (registers train/evaluate/ablate)
    from convscope.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_train_resume_and_evaluate(cli, clean_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = cli("train", "--data", "digits", "--arch", "zfnet_mnist", "--epochs", 2, "--limit", 96, "-b", 24, "-o", run)
    assert done.exit_code == 0, done.output
    assert "epoch 1/2" in done.output and "epoch 2/2" in done.output
    assert f"checkpoint: {run / 'best.pt'}" in done.output
    again = cli("train", "-o", run, "--resume", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["best_epoch"] in (1, 2)
    other = cli("train", "-o", run, "--resume", "--arch", "alexnet_mnist")
    assert other.exit_code == 2
    assert other.output.strip().splitlines()[-1].startswith("error: ") and "not of 'alexnet_mnist'" in other.output

    out = tmp_path / "eval"
    evaluated = cli("evaluate", "--weights", clean_run.best_checkpoint, "--data", "digits", "--limit", 240, "-o", out)
    assert evaluated.exit_code == 0, evaluated.output
    payload = json.loads((out / "evaluation.json").read_text())
    assert payload["accuracy"] == clean_run.test_accuracy and payload["count"] == 240
    assert len(payload["confusion"]) == 10 and sum(map(sum, payload["confusion"])) == 240
    picture = np.asarray(Image.open(out / "confusion.png"))
    assert picture.dtype == np.uint8 and picture.shape[2] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "digits", "--arch", "nonet"], "error: nonet: unknown model"),
        (["--arch", "zfnet_mnist"], "error: --data: is required"),
        (["--data", "digits", "--arch", "zfnet_mnist", "--augment", "spin"], "error: --augment spin: unknown augmentation"),
        (["--data", "digits", "--arch", "zfnet_mnist", "--snapshot-epochs", "1,x"], "error: --snapshot-epochs 1,x"),
    ],
)
def test_cli_train_errors(cli, tmp_path: Path, args: list[str], message: str) -> None:
    result = cli("train", *args, "-o", tmp_path / "r")
    assert result.exit_code == 2
    assert result.output.strip().startswith(message), result.output
    assert "Traceback" not in result.output


def test_cli_empty_folder_and_ablate_error(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cli("train", "--data", tmp_path / "empty", "--arch", "zfnet_mnist", "-o", tmp_path / "r")
    assert result.exit_code == 2 and "is empty: expected one sub-folder of images per class" in result.output
    result = cli("ablate", "--data", "digits", "--arch", "zfnet_mnist", "--variant", "drop:conv7", "-o", tmp_path / "a")
    assert result.exit_code == 2 and "no layer 'conv7'" in result.output
