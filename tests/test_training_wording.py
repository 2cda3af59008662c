"""Training's errors name parameters from Python and flags from the CLI (one error, two wordings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from convscope.errors import BadArgument, TrainingDiverged, WeightsUnavailable
from convscope.training import TrainConfig, resume, train
from convscope.training.evaluate import evaluate
from convscope.training.runrecord import RunFolderError
from convscope.training.wording import literal, option_error, worded

TINY: dict[str, Any] = {"data": "digits", "arch": "tiny", "limit": 64, "batch_size": 32}


@pytest.fixture(scope="module")
def cli():  # type: ignore[no-untyped-def]
    import convscope.cli.train_cmd  # noqa: F401  (registers train/evaluate)
    from convscope.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(("options", "message"), [
    ({"epochs": 0}, r"^epochs 0: must be at least 1$"),
    ({"batch_size": 1}, r"^batch_size 1: must be at least 2 \(BatchNorm needs two images\)$"),
    ({"lr": -1.0}, r"^lr -1.0: must be a positive number$"),
    ({"label_smoothing": 1.0}, r"^label_smoothing 1.0: must be at least 0 and below 1$"),
    ({"freeze": "features"},
     r"^freeze features: freezing needs learned features to keep \(add init_from CKPT or init_from pretrained\)$"),
    ({"epochs": 3, "snapshot_epochs": (5,)}, r"^snapshot_epochs 5: must be between 0 \(before training\) and epochs 3$"),
    ({"arch": None}, r"^arch: is required \(e.g. arch zfnet_mnist; see 'convscope models'\)$"),
    ({"val_split": 1.5}, r"^val_split 1.5: must be at least 0 and below 1$"),
    ({"augment": ("rotate",)}, r"^augment rotate: unknown augmentation \(choose from: crop, flip, color, erase\)$"),
])
def test_library_errors_name_parameters(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        train(TrainConfig(out_dir=str(tmp_path / "run"), **{**TINY, **options}))
    assert not (tmp_path / "run").exists()


def test_library_hints_name_parameters(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match=r"^tiny: has no published pretrained weights "
                                                  r"\(use init_from CKPT with a trained checkpoint\)$"):
        train(TrainConfig(out_dir=str(tmp_path / "a"), init_from="pretrained", **TINY))
    with pytest.raises(BadArgument, match=r"last.pt: no checkpoint to resume from \(start the run without resume=True\)$"):
        resume(tmp_path / "none")
    with pytest.raises(TrainingDiverged, match=r"no checkpoint was written \(try an lr below 1e\+08\)$"):
        train(TrainConfig(out_dir=str(tmp_path / "b"), **{**TINY, "optimizer": "sgd", "lr": 1e8, "epochs": 2}))


def test_resume_epochs_below_done_names_the_parameter(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(out_dir=str(run), **{**TINY, "epochs": 2}))
    with pytest.raises(BadArgument, match=rf"^epochs 1: {run} has already trained 2 epochs "
                                          r"\(give epochs 2 or more to extend it\)$"):
        resume(run, epochs=1)


def test_evaluate_names_its_parameter(tmp_path: Path) -> None:
    from convscope.models.load import load_model

    with pytest.raises(BadArgument, match=r"^split nope: unknown split \(choose from: auto, test, val, train, all\)$"):
        evaluate(load_model("tiny", "random"), "digits", split="nope")


@pytest.mark.parametrize(("args", "line"), [
    (["--freeze", "features"],
     "error: --freeze features: freezing needs learned features to keep (add --from CKPT or --from pretrained)"),
    (["--snapshot-epochs", "50"], "error: --snapshot-epochs 50: must be between 0 (before training) and --epochs 10"),
    (["--label-smoothing", "1"], "error: --label-smoothing 1.0: must be at least 0 and below 1"),
    (["--val-split", "2"], "error: --val-split 2.0: must be at least 0 and below 1"),
    (["--augment", "rotate"], "error: --augment rotate: unknown augmentation (choose from: crop, flip, color, erase)"),
    (["--from", "pretrained"], "error: tiny: has no published pretrained weights (use --from CKPT with a trained checkpoint)"),
])
def test_cli_words_the_same_errors_as_flags(cli, tmp_path: Path, args: list[str], line: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", "--data", "digits", "--arch", "tiny", "--limit", 64, *args, "-o", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [line]


def test_cli_resume_without_a_run_says_the_flag(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("train", "--resume", "-o", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {tmp_path / 'run' / 'last.pt'}: no checkpoint to resume from (start the run without --resume)"
    )


def test_cli_evaluate_says_the_flag(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    train(TrainConfig(out_dir=str(run), **{**TINY, "epochs": 1}))
    result = cli("evaluate", "--weights", run / "best.pt", "--data", "digits", "--split", "nope")
    assert result.exit_code == 2
    assert result.output.strip() == "error: --split nope: unknown split (choose from: auto, test, val, train, all)"


def test_worded_is_a_new_error_and_keeps_braces_in_values() -> None:
    error = option_error(BadArgument, literal("/runs/{a}"), literal("holds {x}") + " for {epochs}",
                         "start the run without {resume}")
    assert str(error) == "/runs/{a}: holds {x} for epochs (start the run without resume=True)"
    again = worded(error, lambda name: "--" + name.replace("_", "-"))
    assert type(again) is BadArgument and again is not error
    assert str(again) == again.message == "/runs/{a}: holds {x} for --epochs (start the run without --resume)"
    assert str(error) == "/runs/{a}: holds {x} for epochs (start the run without resume=True)"
    plain = BadArgument("x", "y")
    assert worded(plain, str.upper) is plain


def test_run_folder_error_keeps_its_wording_method(tmp_path: Path) -> None:
    error = RunFolderError(str(tmp_path / "{odd}"), "use {resume} to continue it or {overwrite} to replace it")
    assert error.reason == "use resume=True to continue it or overwrite=True to replace it"
    flags = error.worded({"resume": "--resume", "overwrite": "--overwrite"})
    assert isinstance(flags, RunFolderError) and flags.subject == str(tmp_path / "{odd}")
    assert flags.reason == "use --resume to continue it or --overwrite to replace it"
