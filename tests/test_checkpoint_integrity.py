"""Checkpoint integrity (issue 8 item 4, issue 13 item 4): every checkpoint convscope writes is sealed
with a schema version, its role and a checksum; one verification runs for load_model, --weights,
--from and --resume; damaged, malformed and foreign files are refused in one line; divergence stops
training with the last good checkpoint kept; every kind of checkpoint round-trips through load_model."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import shapes_folder

import convscope.errors
from convscope.errors import BadWeightsFile, ConvscopeError, DamagedWeightsFile, TrainingDiverged
from convscope.models.checkpoints import CHECKPOINT_VERSION, checkpoint_checksum, seal
from convscope.models.load import load_model
from convscope.models.weights import read_weights_file
from convscope.training import TrainConfig, resume, train
from convscope.training.checkpoint import CheckpointWriteError, read_checkpoint

TINY = {"data": "digits", "arch": "zfnet_mnist", "epochs": 2, "limit": 48, "batch_size": 24, "seed": 3}
PHOTO = Path(__file__).resolve().parents[1] / "convscope" / "data" / "chelsea.jpg"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("integrity") / "run"
    train(TrainConfig(out_dir=str(folder), **TINY))
    return folder


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _offset_of(path: Path, needle: bytes) -> int:
    data = path.read_bytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the bytes to flip must occur exactly once"
    return at + len(needle) // 2


def _cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convscope", *map(str, args)], check=False, capture_output=True, text=True, timeout=300,
        cwd=cwd, env={**os.environ, "CONVSCOPE_DEBUG": "0"},
    )


# -- what is written ------------------------------------------------------------------------------


def test_every_checkpoint_is_sealed_with_version_role_and_checksum(run: Path) -> None:
    last, best = _raw(run / "last.pt"), _raw(run / "best.pt")
    assert last["version"] == best["version"] == CHECKPOINT_VERSION == 2
    assert (last["role"], best["role"]) == ("last", "best")
    for checkpoint in (last, best):
        assert checkpoint["checksum"] == checkpoint_checksum(checkpoint)
        assert checkpoint["checksum"].startswith("sha256:") and len(checkpoint["checksum"]) == 7 + 64
    # The checksum covers tensors, optimizer state and metadata alike.
    assert checkpoint_checksum({**last, "epoch": 1}) != last["checksum"]
    moments = {**last["optimizer"]["state"][0], "exp_avg": last["optimizer"]["state"][0]["exp_avg"].clone()}
    moments["exp_avg"].view(-1)[0] += 1e-7
    changed = {**last, "optimizer": {**last["optimizer"], "state": {**last["optimizer"]["state"], 0: moments}}}
    assert checkpoint_checksum(changed) != last["checksum"]
    # A channels-last copy of a weight hashes like the contiguous one (logical order).
    weight = "features.0.weight"
    state = dict(last["state_dict"], **{weight: last["state_dict"][weight].to(memory_format=torch.channels_last)})
    assert checkpoint_checksum({**last, "state_dict": state}) == last["checksum"]


def test_checkpoint_write_error_lives_in_errors() -> None:
    assert CheckpointWriteError is convscope.errors.CheckpointWriteError
    assert issubclass(DamagedWeightsFile, BadWeightsFile)


# -- damaged files --------------------------------------------------------------------------------


def _weight_bytes(raw: dict) -> bytes:
    return raw["state_dict"]["features.0.weight"].numpy().tobytes()


def _optimizer_bytes(raw: dict) -> bytes:
    return raw["optimizer"]["state"][0]["exp_avg_sq"].numpy().tobytes()


@pytest.mark.parametrize("where", ["weight tensor", "optimizer state", "metadata"])
def test_bit_flipped_last_pt_is_refused_by_resume_and_by_load_model(run: Path, tmp_path: Path, where: str) -> None:
    folder = _copy(run, tmp_path)
    last = folder / "last.pt"
    raw = _raw(last)
    if where == "metadata":
        # Inside the pickled architecture name: "zfnet_mnist" becomes "zfnet^mnist", still a valid string.
        offset = last.read_bytes().find(b"zfnet_mnist") + 5
    else:
        offset = _offset_of(last, (_weight_bytes if where == "weight tensor" else _optimizer_bytes)(raw))
    _flip(last, offset, bit=0)  # the lowest bit: a tiny change, exactly what loads silently without a checksum
    metrics_before = (folder / "metrics.jsonl").read_text()
    message = r"last.pt: damaged checkpoint: its contents do not match the checksum written with it"
    with pytest.raises(DamagedWeightsFile, match=message):
        resume(folder)
    with pytest.raises(DamagedWeightsFile, match=message):
        load_model(weights=last)
    with pytest.raises(DamagedWeightsFile, match=message):
        train(TrainConfig(out_dir=str(folder), **TINY, resume=True))
    assert (folder / "metrics.jsonl").read_text() == metrics_before


def test_truncated_and_zip_damaged_files_are_refused_as_damaged(run: Path, tmp_path: Path) -> None:
    data = (run / "best.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedWeightsFile, match=r"cut.pt: damaged PyTorch archive: it cannot be read \(.*\) "
                                                 r"\(the file is truncated or corrupted; restore a copy\)"):
        load_model(weights=cut)


def test_random_bit_flips_never_load_changed_content(run: Path, tmp_path: Path) -> None:
    """60 single-bit flips, two thirds of them in the pickled metadata: each one is refused with a
    ConvscopeError, or (a flip in bytes nothing reads, like a zip timestamp) loads identical content."""
    original = (run / "best.pt").read_bytes()
    reference = _raw(run / "best.pt")
    with zipfile.ZipFile(run / "best.pt") as archive:
        pickled = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    start = pickled.header_offset + 30 + len(pickled.filename) + len(pickled.extra)
    rng = random.Random(0)
    target = tmp_path / "best.pt"
    outcomes = {"refused": 0, "identical": 0}
    for i in range(60):
        offset = rng.randrange(start, start + pickled.compress_size) if i % 3 else rng.randrange(len(original))
        data = bytearray(original)
        data[offset] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        try:
            loaded = read_weights_file(target)
        except ConvscopeError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        assert checkpoint_checksum(loaded) == reference["checksum"], f"flip at byte {offset} changed the content"
        outcomes["identical"] += 1
    assert outcomes["refused"] >= 45, outcomes


# -- malformed metadata (sealed with a valid checksum, so the schema check is what refuses) --------


def _edited(run: Path, tmp_path: Path, name: str, edit, *, reseal: bool = True) -> Path:
    raw = _raw(run / name)
    edit(raw)
    path = tmp_path / name
    torch.save(seal(raw) if reseal else raw, path)
    return path


def _set(key: str, value: object):
    def edit(raw: dict) -> None:
        raw[key] = value

    return edit


def _drop(key: str):
    return lambda raw: raw.pop(key)


def _config(key: str, value: object):
    def edit(raw: dict) -> None:
        raw["config"] = {**raw["config"], key: value}

    return edit


MALFORMED = [
    (_drop("arch"), r"invalid checkpoint: missing 'arch'"),
    (_drop("config"), r"invalid checkpoint: missing 'config'"),
    (_drop("rng"), r"invalid checkpoint: missing 'rng'"),
    (_set("state_dict", [torch.zeros(3)]), r"invalid checkpoint: 'state_dict' is a list, expected a dict of tensors"),
    (_set("state_dict", {"w": "weights"}), r"invalid checkpoint: 'state_dict' entry 'w' is a str \('weights'\), not a tensor"),
    (_set("preprocess", {"crop": 28}), r"invalid checkpoint: 'preprocess' lacks resize, mean, std, channels"),
    (_set("preprocess", {"resize": None, "crop": 28, "mean": [0.5], "std": [0.0], "channels": 1}),
     r"invalid checkpoint: 'preprocess.std' is \[0.0\], expected positive numbers"),
    (_set("preprocess", {"resize": None, "crop": 28, "mean": [0.5, 0.5], "std": [0.5, 0.5], "channels": 1}),
     r"invalid checkpoint: 'preprocess.mean' is \[0.5, 0.5\], expected 1 numbers \(one per channel\)"),
    (_set("preprocess", "28x28"), r"invalid checkpoint: 'preprocess' is a str \('28x28'\), expected a dict"),
    (_config("epochs", "2"), r"invalid checkpoint: 'config.epochs' is a str \('2'\), expected a whole number of epochs"),
    (_set("epoch", -1), r"invalid checkpoint: 'epoch' -1 is outside the run's 0..2 epochs"),
    (_set("epoch", 7), r"invalid checkpoint: 'epoch' 7 is outside the run's 0..2 epochs"),
    (_set("categories", []), r"invalid checkpoint: 'categories' is a list, expected a non-empty list of class names"),
    (_set("role", "final"), r"invalid checkpoint: 'role' is 'final', expected 'last' or 'best'"),
]


@pytest.mark.parametrize(("edit", "message"), MALFORMED)
def test_malformed_metadata_is_refused_in_one_line_everywhere(run: Path, tmp_path: Path, edit, message: str) -> None:
    path = _edited(run, tmp_path, "last.pt", edit)
    for attempt in (lambda: load_model(weights=path), lambda: resume(tmp_path)):
        with pytest.raises(BadWeightsFile, match=message) as caught:
            attempt()
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_schema_is_checked_before_the_checksum(run: Path, tmp_path: Path) -> None:
    # Edited by hand without resealing: the specific problem is named, not just "damaged".
    path = _edited(run, tmp_path, "last.pt", _drop("arch"), reseal=False)
    with pytest.raises(BadWeightsFile, match="invalid checkpoint: missing 'arch'"):
        load_model(weights=path)
    path = _edited(run, tmp_path, "best.pt", lambda raw: raw["metrics"].update(train_loss=0.0), reseal=False)
    with pytest.raises(DamagedWeightsFile, match="damaged checkpoint"):
        load_model(weights=path)


def test_resume_checks_config_types_and_rng(run: Path, tmp_path: Path) -> None:
    path = _edited(run, tmp_path, "last.pt", _config("lr", "fast"))
    with pytest.raises(BadWeightsFile, match=r"last.pt: invalid checkpoint: 'config.lr' is a str \('fast'\), "
                                             r"expected float \| None"):
        resume(tmp_path)
    path = _edited(run, tmp_path, "last.pt", lambda raw: raw["rng"].pop("numpy"))
    with pytest.raises(BadWeightsFile, match=r"invalid checkpoint: 'rng' has data, python, torch states, "
                                             r"expected data, numpy, python, torch"):
        resume(tmp_path)
    assert load_model(weights=path).name == "zfnet_mnist"  # inference does not need the RNG state


def test_future_schema_is_refused_by_load_model_and_resume_alike(run: Path, tmp_path: Path) -> None:
    path = _edited(run, tmp_path, "last.pt", lambda raw: None)
    raw = _raw(path)
    torch.save({**raw, "version": CHECKPOINT_VERSION + 1}, path)
    message = r"last.pt: checkpoint schema version 3 is newer than this convscope reads \(2\) \(upgrade convscope"
    with pytest.raises(BadWeightsFile, match=message):
        load_model(weights=path)
    with pytest.raises(BadWeightsFile, match=message):
        resume(tmp_path)


def test_best_pt_renamed_to_last_pt_cannot_resume(run: Path, tmp_path: Path) -> None:
    folder = _copy(run, tmp_path)
    (folder / "best.pt").replace(folder / "last.pt")
    with pytest.raises(BadWeightsFile, match=r"last.pt: was written as best.pt \(weights for inference, no optimizer or "
                                             r"RNG state\), not as a resumable last.pt \(a renamed best.pt cannot"):
        resume(folder)
    assert load_model(weights=folder / "last.pt").name == "zfnet_mnist"  # still fine for inference


def test_legacy_schema_1_checkpoints_still_load(run: Path, tmp_path: Path) -> None:
    raw = _raw(run / "best.pt")
    legacy = {k: v for k, v in raw.items() if k not in ("role", "checksum")} | {"version": 1}
    torch.save(legacy, tmp_path / "old.pt")
    loaded = load_model(weights=tmp_path / "old.pt")
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in raw["state_dict"].items())


# -- foreign files ------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/convscope-integrity-pwned",))


def _foreign_files(folder: Path) -> dict[str, tuple[Path, str]]:
    json_file = folder / "weights.pth"
    json_file.write_text(json.dumps({"conv1.weight": [[0.1, 0.2]], "epoch": 3}))
    evil = folder / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle, protocol=4)  # protocol 4 makes torch warn
    return {
        "json": (json_file, r"weights.pth: not a weights file \(it holds JSON text; expected a PyTorch .pt/.pth file"),
        "passwd": (Path("/etc/passwd"), r"/etc/passwd: not a weights file \(it holds text; expected"),
        "pickle": (evil, r"evil.pth: refused to load: the file holds pickled objects other than tensors \(it could run"),
    }


@pytest.mark.parametrize("kind", ["json", "passwd", "pickle"])
def test_foreign_files_get_their_own_one_line_reason(tmp_path: Path, kind: str) -> None:
    path, message = _foreign_files(tmp_path)[kind]
    with pytest.raises(BadWeightsFile, match=message):
        load_model("zfnet_mnist", weights=path)
    assert not Path("/tmp/convscope-integrity-pwned").exists()


@pytest.mark.parametrize("kind", ["json", "passwd", "pickle", "damaged", "future"])
def test_cli_weights_refusals_are_one_line(run: Path, tmp_path: Path, kind: str) -> None:
    if kind == "damaged":
        path = Path(shutil.copy(run / "best.pt", tmp_path / "best.pt"))
        _flip(path, _offset_of(path, _weight_bytes(_raw(path))))
        message = r"best.pt: damaged checkpoint: its contents do not match the checksum"
    elif kind == "future":
        path = tmp_path / "best.pt"
        torch.save({**_raw(run / "best.pt"), "version": 99}, path)
        message = r"best.pt: checkpoint schema version 99 is newer than this convscope reads"
    else:
        path, message = _foreign_files(tmp_path)[kind]
    done = _cli("classify", PHOTO, "--weights", path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no torch UserWarning, no traceback
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]


def test_cli_resume_of_a_damaged_run_is_one_line(run: Path, tmp_path: Path) -> None:
    folder = _copy(run, tmp_path)
    _flip(folder / "last.pt", _offset_of(folder / "last.pt", _optimizer_bytes(_raw(folder / "last.pt"))))
    done = _cli("train", "-o", folder, "--resume")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (f"error: {folder / 'last.pt'}: damaged checkpoint: its contents do not match the checksum written with it "
         "(the file changed after convscope wrote it; restore a copy or train again)")
    ]


# -- divergence ---------------------------------------------------------------------------------------


def test_non_finite_loss_stops_training_and_keeps_the_last_good_epoch(tmp_path: Path, monkeypatch) -> None:
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss = real(logits, target, *args, **kwargs)
        if "label_smoothing" in kwargs:  # the training step's loss, not evaluation's
            calls["train"] += 1
            if calls["train"] == 3:  # epoch 2, step 1 (two steps per epoch)
                return loss * float("nan")
        return loss

    folder = tmp_path / "run"
    config = TrainConfig(out_dir=str(folder), **TINY)
    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match=r"run: training diverged in epoch 2: the loss became nan at step 1 of 2; "
                                               r"stopped, last.pt keeps epoch 1, the last good one "
                                               r"\(try an lr below 0.003\)"):
        train(config)
    monkeypatch.setattr(F, "cross_entropy", real)
    assert read_checkpoint(folder / "last.pt", role="last")["epoch"] == 1
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert not (folder / "result.json").exists()
    # The kept checkpoint is good: the run resumes from it and finishes.
    finished = resume(folder)
    assert finished.resumed_from == 1 and len(finished.history) == 2


def test_non_finite_validation_loss_stops_before_saving(tmp_path: Path, monkeypatch) -> None:
    from convscope.training import loop

    real = loop.evaluate_split

    def overflowing(*args, **kwargs):  # type: ignore[no-untyped-def]
        scores = real(*args, **kwargs)
        return replace(scores, loss=float("inf"))

    monkeypatch.setattr(loop, "evaluate_split", overflowing)
    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 1: the val loss is inf; stopped, "
                                               r"no checkpoint was written"):
        train(TrainConfig(out_dir=str(tmp_path / "run"), **TINY))
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_divergence_is_one_line(tmp_path: Path) -> None:
    done = _cli("train", "--data", "digits", "--arch", "zfnet_mnist", "--epochs", 2, "--limit", 48, "-b", 24,
                "--optimizer", "sgd", "--lr", "1e8", "-o", tmp_path / "run")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'run'}: training diverged in epoch 1: ") and "Traceback" not in done.stderr
    assert last.endswith("stopped, no checkpoint was written (try an --lr below 1e+08)")


# -- every kind of checkpoint round-trips through load_model -----------------------------------------



@pytest.fixture(scope="module")
def every_kind(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from convscope.training.ablation import ablate

    root = tmp_path_factory.mktemp("kinds")
    ablation = root / "ablation"
    ablate(TrainConfig(out_dir=str(ablation), **{**TINY, "epochs": 1}), ["drop:conv3,conv4", "width:conv2=16"])
    fast = root / "fast"
    train(TrainConfig(out_dir=str(fast), **{**TINY, "epochs": 1}, precision="bf16", channels_last=True))
    transfer = root / "transfer"
    train(TrainConfig(data=str(shapes_folder(root / "shapes", per_class=10)), out_dir=str(transfer), epochs=1, batch_size=8,
                      init_from=str(ablation / "drop-conv3-conv4" / "best.pt"), freeze="features"))
    # Killed between writing last.pt and best.pt: resuming rewrites best.pt from last.pt. (Without a
    # validation split every epoch is the best, so the lost best.pt is always last.pt's epoch.)
    repaired = root / "repaired"
    train(TrainConfig(out_dir=str(repaired), **{**TINY, "epochs": 1}, val_split=0))
    (repaired / "best.pt").unlink()
    (repaired / "result.json").unlink()
    resume(repaired)
    kinds = {"last": run / "last.pt", "best": run / "best.pt", "repaired best": repaired / "best.pt",
             "bf16 channels-last": fast / "best.pt", "transfer from a variant": transfer / "best.pt",
             "transfer last": transfer / "last.pt"}
    for slug in ("base", "drop-conv3-conv4", "width-conv2-16"):
        kinds[f"ablation {slug} best"] = ablation / slug / "best.pt"
        kinds[f"ablation {slug} last"] = ablation / slug / "last.pt"
    return kinds


KINDS = ["last", "best", "repaired best", "bf16 channels-last", "transfer from a variant", "transfer last",
         "ablation base best", "ablation base last", "ablation drop-conv3-conv4 best", "ablation drop-conv3-conv4 last",
         "ablation width-conv2-16 best", "ablation width-conv2-16 last"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_checkpoint_round_trips_through_load_model(every_kind: dict[str, Path], kind: str) -> None:
    path = every_kind[kind]
    raw = _raw(path)
    assert raw["checksum"] == checkpoint_checksum(raw)
    loaded = load_model(weights=path)
    assert loaded.name == raw["arch"] and list(loaded.categories) == raw["categories"]
    assert loaded.preprocess.input_size == (1, 28, 28)
    state = loaded.module.state_dict()
    assert set(state) == set(raw["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in raw["state_dict"].items())
    logits = loaded.module(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, len(raw["categories"])) and bool(torch.isfinite(logits).all())
    if "drop" in kind or "variant" in kind:
        assert raw["variant"] == "drop:conv3,conv4"
        assert list(loaded.stages) == ["conv1", "conv2", "conv5"]  # the dropped stages are gone
    if "width" in kind:
        assert raw["variant"] == "width:conv2=16" and state["features.4.weight"].shape[0] == 16


def test_cli_weights_opens_an_ablation_variant(every_kind: dict[str, Path]) -> None:
    done = _cli("classify", PHOTO, "--weights", every_kind["ablation drop-conv3-conv4 best"], "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)
