"""Honest model selection (issue 13 item 3): best.pt is chosen on validation data only (held out of the
training set by default), and the test accuracy reported is best.pt's, measured once after training."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from convscope.models.load import load_model
from convscope.training import TrainConfig, train
from convscope.training import loop as training_loop
from convscope.training.data import FASHION_MNIST_ENV, fashion_mnist_available, fashion_mnist_dir, read_idx
from convscope.training.evaluate import evaluate

needs_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)",
)
SMALL = {"data": "fashion-mnist", "arch": "zfnet_mnist", "epochs": 4, "limit": 256, "batch_size": 32, "seed": 1,
         "augment": ("crop", "flip")}
TIMING = ("images_per_second", "epoch_seconds")


def _strip(history) -> list[dict]:  # type: ignore[no-untyped-def]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def _fashion_copy(folder: Path, test_labels: np.ndarray) -> Path:
    """Fashion-MNIST's IDX files in ``folder``, with other test labels."""
    folder.mkdir(parents=True)
    source = fashion_mnist_dir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        name = next(n for n in (stem + ".gz", stem) if (source / n).is_file())
        (folder / name).symlink_to(source / name)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">HBBI", 0, 0x08, 1, len(test_labels)) + test_labels.astype(np.uint8).tobytes())
    return folder


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory):
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed")
    return train(TrainConfig(out_dir=str(tmp_path_factory.mktemp("honest") / "run"), **SMALL))


@needs_fashion
def test_fashion_mnist_holds_out_a_seeded_validation_split_by_default(honest_run) -> None:
    assert honest_run.selection == "val"
    assert honest_run.data["splits"] == {"train": 256, "val": 256, "test": 256}
    assert honest_run.data["validation"] == "10% of the training images held out per class (split seed 0)"
    best = max(honest_run.history, key=lambda m: m["val_accuracy"])
    assert honest_run.best_epoch == best["epoch"] and honest_run.best == best
    # Training never scored the test split: no epoch's metrics mention it.
    assert not [key for m in honest_run.history for key in m if key.startswith("test")]
    saved = json.loads((honest_run.run_dir / "result.json").read_text())
    assert saved["selection"] == "val" and saved["validation"] == honest_run.data["validation"]
    assert saved["test"]["epoch"] == honest_run.best_epoch and saved["test"]["checkpoint"] == "best.pt"
    assert "the test split chose nothing" in saved["test"]["note"]
    assert json.loads((honest_run.run_dir / "data.json").read_text())["validation"] == honest_run.data["validation"]


@needs_fashion
def test_test_accuracy_is_measured_on_the_chosen_checkpoint(honest_run) -> None:
    loaded = load_model(weights=honest_run.best_checkpoint)
    scores = evaluate(loaded, "fashion-mnist", limit=256)
    assert scores.count == honest_run.test["count"] == 256
    assert scores.accuracy == honest_run.test_accuracy and scores.loss == pytest.approx(honest_run.test["loss"])
    # The held-out validation images are not test images and not training images.
    val = evaluate(loaded, "fashion-mnist", split="val", limit=256)
    assert val.accuracy == honest_run.best["val_accuracy"]


@needs_fashion
def test_best_pt_never_depends_on_test_labels(honest_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with the test labels scrambled chooses the same epoch and writes the same best.pt,
    byte for byte in its weights; only the reported test accuracy changes."""
    true_labels = read_idx(next(fashion_mnist_dir().glob("t10k-labels-idx1-ubyte*")))
    scrambled = (true_labels + 1 + np.random.default_rng(5).integers(0, 9, true_labels.shape)) % 10
    assert not np.any(scrambled == true_labels)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(_fashion_copy(tmp_path / "scrambled", scrambled)))
    other = train(TrainConfig(out_dir=str(tmp_path / "run"), **SMALL))

    assert other.best_epoch == honest_run.best_epoch
    assert _strip(other.history) == _strip(honest_run.history)
    mine = torch.load(honest_run.best_checkpoint, weights_only=True)["state_dict"]
    theirs = torch.load(other.best_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Every test label is now wrong, so best.pt's test accuracy collapses (a wrong guess can still
    # hit a scrambled label); the choice of best.pt did not notice.
    assert other.test_accuracy is not None and honest_run.test_accuracy is not None
    assert other.test_accuracy < 0.15 and honest_run.test_accuracy > 0.5


@needs_fashion
def test_the_test_split_is_scored_once_after_the_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    scored_best: list[bool] = []
    real = training_loop.evaluate_split
    run = tmp_path / "run"

    def spy(module, split, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(split.name)
        if split.name == "test":
            best = torch.load(run / "best.pt", weights_only=True)["state_dict"]
            state = module.state_dict()
            scored_best.append(all(torch.equal(state[k].cpu(), v) for k, v in best.items()))
        return real(module, split, *args, **kwargs)

    monkeypatch.setattr(training_loop, "evaluate_split", spy)
    result = train(TrainConfig(out_dir=str(run), **{**SMALL, "epochs": 3}))
    assert seen == ["val", "val", "val", "test"]
    assert scored_best == [True]
    assert result.test is not None and result.test["count"] == 256


@needs_fashion
def test_val_split_zero_keeps_the_last_epoch(tmp_path: Path) -> None:
    result = train(TrainConfig(out_dir=str(tmp_path / "run"), **{**SMALL, "epochs": 2}, val_split=0))
    assert result.selection == "last" and result.best_epoch == 2
    assert result.data["validation"] == "none (best.pt is the last epoch)"
    assert result.data["splits"] == {"train": 256, "test": 256}
    assert result.test is not None and result.test["epoch"] == 2


def test_cli_says_how_best_pt_was_chosen(tmp_path: Path) -> None:
    import convscope.cli.train_cmd  # noqa: F401  (registers train)
    from convscope.cli.main import app

    run = tmp_path / "run"
    done = CliRunner().invoke(app, ["train", "--data", "digits", "--arch", "zfnet_mnist", "--epochs", "1",
                                    "--limit", "48", "-b", "24", "-o", str(run)])
    assert done.exit_code == 0, done.output
    assert ("best epoch 1/1: chosen on val accuracy "
            in done.output) and "validation: 10% of the training images held out per class (split seed 0)" in done.output
    saved = json.loads((run / "result.json").read_text())
    assert f"test accuracy of best.pt: {saved['test']['accuracy']:.4f} (48 images, measured once)" in done.output
    shutil.rmtree(run)
