"""`convscope train` and `convscope ablate` never replace what they did not write, refuse to mix an
earlier run with a new one, refuse to resume on changed data, and turn a full disk into one line.

Every run here is tiny (digits or a shapes folder, --limit, one epoch), so the file runs in seconds
per test."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import shapes_folder
from typer.testing import CliRunner

QUICK = ["--data", "digits", "--arch", "zfnet_mnist", "--epochs", "1", "--limit", "48", "-b", "24"]
RUN_FILES = ("config.json", "data.json", "metrics.jsonl", "last.pt", "best.pt", "result.json")


@pytest.fixture(scope="module")
def cli():
    import convscope.cli.train_cmd  # noqa: F401  (registers train/evaluate/ablate)
    from convscope.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) -> its sha256."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".convscope.lock"
    }


def _one_error(result, pattern: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert re.fullmatch(pattern, errors[0]), errors[0]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory, cli) -> Path:  # type: ignore[no-untyped-def]
    """A finished one-epoch run, copied by each test that changes it."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    done = cli("train", *QUICK, "-o", run)
    assert done.exit_code == 0, done.output
    return run


def _copy(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


# -- finding 1: a new train into a folder that holds something -----------------------------------


def test_train_refuses_a_folder_holding_an_earlier_run(cli, earlier: Path, tmp_path: Path) -> None:
    run = _copy(earlier, tmp_path / "run")
    before = _snapshot(run)
    result = cli("train", *QUICK, "-o", run)
    _one_error(result, rf"error: {re.escape(str(run))}: holds an earlier run \([^)]*\); "
                       r"use --resume to continue it or --overwrite to replace it")
    assert _snapshot(run) == before


def test_train_refuses_an_earlier_runs_best_pt_once_last_pt_is_gone(cli, earlier: Path, tmp_path: Path) -> None:
    run = _copy(earlier, tmp_path / "run")
    (run / "last.pt").unlink()
    before = _snapshot(run)
    result = cli("train", *QUICK, "-o", run)
    _one_error(result, rf"error: {re.escape(str(run))}: holds an earlier run \([^)]*\); "
                       r"use --resume to continue it or --overwrite to replace it")
    assert _snapshot(run) == before
    # --overwrite replaces exactly the earlier run's files.
    again = cli("train", *QUICK, "-o", run, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (run / "last.pt").is_file()
    assert json.loads((run / "run.json").read_text())["run_id"] != json.loads(
        (earlier / "run.json").read_text())["run_id"]


@pytest.mark.parametrize("name", ["best.pt", "config.json", "metrics.jsonl", "result.json", "data.json"])
def test_train_never_replaces_a_users_file_of_a_run_name(cli, tmp_path: Path, name: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b"my own file\n")
    for extra in ([], ["--overwrite"]):
        result = cli("train", *QUICK, "-o", run, *extra)
        _one_error(result, rf"error: {re.escape(str(run / name))}: was not written by a convscope run "
                           r"\(or changed since\); it is left as it is .*")
        assert (run / name).read_bytes() == b"my own file\n"
        assert not (run / "last.pt").exists()


def test_train_refuses_a_changed_recorded_file_even_with_overwrite(cli, earlier: Path, tmp_path: Path) -> None:
    run = _copy(earlier, tmp_path / "run")
    (run / "metrics.jsonl").write_text("edited by hand\n")
    before = _snapshot(run)
    result = cli("train", *QUICK, "-o", run, "--overwrite")
    _one_error(result, rf"error: {re.escape(str(run / 'metrics.jsonl'))}: was not written by a convscope run .*")
    assert _snapshot(run) == before


def test_legacy_best_pt_without_last_pt_is_a_users_file(cli, earlier: Path, tmp_path: Path) -> None:
    run = _copy(earlier, tmp_path / "run")
    (run / "run.json").unlink()
    (run / "last.pt").unlink()
    before = _snapshot(run)
    for extra in ([], ["--overwrite"]):
        result = cli("train", *QUICK, "-o", run, *extra)
        _one_error(result, r"error: .*: was not written by a convscope run .*")
        assert _snapshot(run) == before


def test_foreign_files_of_other_names_need_overwrite_and_are_left_alone(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "notes").mkdir(parents=True)
    (run / "notes.txt").write_text("mine\n")
    (run / "notes" / "a.txt").write_text("mine too\n")
    before = _snapshot(run)
    result = cli("train", *QUICK, "-o", run)
    _one_error(result, rf"error: {re.escape(str(run))}: holds files no convscope run wrote \(notes, notes.txt\); "
                       r"use --overwrite to train beside them \(they are left alone\)")
    assert _snapshot(run) == before
    done = cli("train", *QUICK, "-o", run, "--overwrite")
    assert done.exit_code == 0, done.output
    after = _snapshot(run)
    assert {k: after[k] for k in before} == before
    assert set(RUN_FILES) | {"run.json"} <= set(after)


def test_overwrite_replaces_only_the_earlier_runs_files(cli, earlier: Path, tmp_path: Path) -> None:
    run = _copy(earlier, tmp_path / "run")
    (run / "mine.txt").write_text("keep\n")
    done = cli("train", *QUICK, "--seed", "3", "-o", run, "--overwrite")
    assert done.exit_code == 0, done.output
    assert (run / "mine.txt").read_text() == "keep\n"
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    record = json.loads((run / "run.json").read_text())
    assert set(record["files"]) == set(RUN_FILES)
    for name, entry in record["files"].items():
        assert entry["sha256"] == hashlib.sha256((run / name).read_bytes()).hexdigest()


def test_run_record_and_help(cli, earlier: Path) -> None:
    record = json.loads((earlier / "run.json").read_text())
    assert record["format"] == "convscope-run" and re.fullmatch(r"[0-9a-f]{32}", record["run_id"])
    assert set(record["files"]) == set(RUN_FILES)
    for name, entry in record["files"].items():
        assert entry["sha256"] == hashlib.sha256((earlier / name).read_bytes()).hexdigest()
    shown = " ".join(cli("train", "--help").output.split())
    assert "--overwrite" in shown and "run.json" in shown


def test_resume_still_works_and_legacy_folders_resume(cli, earlier: Path, tmp_path: Path) -> None:
    run = _copy(earlier, tmp_path / "run")
    done = cli("train", "-o", run, "--resume", "--epochs", "2")
    assert done.exit_code == 0, done.output
    legacy = _copy(earlier, tmp_path / "legacy")
    (legacy / "run.json").unlink()
    result = cli("train", *QUICK, "-o", legacy)
    _one_error(result, r"error: .*: holds an earlier run \([^)]*\); use --resume to continue it .*")
    done = cli("train", "-o", legacy, "--resume", "--epochs", "2")
    assert done.exit_code == 0, done.output
    assert json.loads((legacy / "result.json").read_text())["final"]["epoch"] == 2


# -- finding 2: ablate -----------------------------------------------------------------------------


ABLATE = ["--data", "digits", "--arch", "zfnet_mnist", "--epochs", "1", "--limit", "48", "-b", "24",
          "--no-base", "--variant", "width:conv2=8"]


@pytest.mark.parametrize("name", ["ablation.md", "ablation.json"])
def test_ablate_never_replaces_a_users_table(cli, tmp_path: Path, name: str) -> None:
    out = tmp_path / "abl"
    out.mkdir()
    (out / name).write_text("my table\n")
    result = cli("ablate", *ABLATE, "-o", out)
    _one_error(result, rf"error: {re.escape(str(out / name))}: was not written by convscope ablate.*")
    assert (out / name).read_text() == "my table\n"
    assert not (out / "width-conv2-8").exists()  # refused before anything trained


def test_ablate_rerun_reuses_and_rewrites_its_own_tables(cli, tmp_path: Path) -> None:
    out = tmp_path / "abl"
    first = cli("ablate", *ABLATE, "-o", out)
    assert first.exit_code == 0, first.output
    checkpoint = (out / "width-conv2-8" / "best.pt").read_bytes()
    again = cli("ablate", *ABLATE, "-o", out)
    assert again.exit_code == 0, again.output
    assert (out / "width-conv2-8" / "best.pt").read_bytes() == checkpoint  # reused, not retrained
    assert (out / "ablation.md").read_text().startswith("| variant |")
    # A variant folder holding a finished run of other options is not passed off as this one.
    other = cli("ablate", *[a if a != "48" else "72" for a in ABLATE], "-o", out)
    _one_error(other, rf"error: {re.escape(str(out / 'width-conv2-8'))}: holds an earlier run \([^)]*\) "
                      r"with other options: limit 72 vs 48.*")


# -- finding 7: resume on changed data ---------------------------------------------------------------


def test_resume_refuses_an_image_folder_that_changed(cli, tmp_path: Path) -> None:
    data = shapes_folder(tmp_path / "shapes", per_class=6)
    run = tmp_path / "run"
    done = cli("train", "--data", data, "--arch", "zfnet_mnist", "--epochs", "1", "-b", "4", "-o", run)
    assert done.exit_code == 0, done.output
    # Same count: one image removed, another added.
    (data / "bars" / "0.png").rename(tmp_path / "0.png")
    (data / "blobs" / "new.png").write_bytes((data / "blobs" / "1.png").read_bytes())
    before = _snapshot(run)
    result = cli("train", "-o", run, "--resume", "--epochs", "2")
    _one_error(result, rf"error: {re.escape(str(data))}: the data changed since the run started \(18 image "
                       r"files then, 18 now; their names, sizes or modification times differ\).*")
    assert _snapshot(run) == before


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_resume_refuses_changed_fashion_mnist_files(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "fm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for stem, count in (("train", 60), ("t10k", 20)):
        images = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(_idx(labels))
    monkeypatch.setenv("CONVSCOPE_FASHION_MNIST", str(folder))
    run = tmp_path / "run"
    done = cli("train", "--data", "fashion-mnist", "--arch", "zfnet_mnist", "--epochs", "1", "-b", "10", "-o", run)
    assert done.exit_code == 0, done.output
    labels = folder / "train-labels-idx1-ubyte"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    result = cli("train", "-o", run, "--resume", "--epochs", "2")
    _one_error(result, r"error: fashion-mnist: the data changed since the run started .*")


# -- finding 8: numbers in ablate and train options -----------------------------------------------


@pytest.mark.parametrize("variant", ["width:conv2=²", "width:conv2=١٢", "width:conv2=99999999999999999999999",
                                     "width:conv2=0", "width:conv2=-3"])
def test_ablate_variant_numbers(cli, tmp_path: Path, variant: str) -> None:
    result = cli("ablate", *ABLATE[:-2], "--variant", variant, "-o", tmp_path / "a")
    _one_error(result, rf"error: --variant {re.escape(variant)}: .*")


@pytest.mark.parametrize("epochs", ["1,²", "1,١", "99999999999999999999999", "1,-1", "0,x"])
def test_train_snapshot_epoch_numbers(cli, tmp_path: Path, epochs: str) -> None:
    result = cli("train", *QUICK, "--snapshot-epochs", epochs, "-o", tmp_path / "r")
    _one_error(result, r"error: --snapshot-epochs .*")
    assert not (tmp_path / "r" / "last.pt").exists()


# -- finding 12: a full disk ---------------------------------------------------------------------------


def test_full_disk_while_writing_the_run_lock(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".convscope.lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    run = tmp_path / "run"
    result = cli("train", *QUICK, "-o", run)
    _one_error(result, rf"error: {re.escape(str(run / '.convscope.lock'))}: no space left on /\S* "
                       r"\(\d+ bytes needed\).*")


@pytest.mark.parametrize("fail_on", ["last.pt", "run.json", "metrics.jsonl", "result.json"])
def test_full_disk_while_writing_run_files(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           fail_on: str) -> None:
    import builtins

    real_open = builtins.open
    real_write = os.write

    class Full:
        def __init__(self, handle):  # type: ignore[no-untyped-def]
            self._handle = handle

        def write(self, data):  # type: ignore[no-untyped-def]
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self._handle, name)

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            return self._handle.__exit__(*exc)

    def is_target(name: object) -> bool:
        return f".{fail_on}.convscope-" in os.path.basename(str(name))

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = real_open(file, mode, *args, **kwargs)
        return Full(handle) if "w" in mode and is_target(file) else handle

    monkeypatch.setattr(builtins, "open", fake_open)
    import tempfile

    real_ntf = tempfile.NamedTemporaryFile

    def fake_ntf(*args, **kwargs):  # type: ignore[no-untyped-def]
        handle = real_ntf(*args, **kwargs)
        return Full(handle) if is_target(handle.name) else handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", fake_ntf)
    monkeypatch.setattr(os, "write", real_write)
    run = tmp_path / "run"
    result = cli("train", *QUICK, "-o", run)
    _one_error(result, rf"error: {re.escape(str(run / fail_on))}: no space left on /\S* \(\d+ bytes needed.*")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def test_full_disk_on_a_real_tmpfs(cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        run = disk / "run"
        result = cli("train", *QUICK, "-o", run)
        _one_error(result, rf"error: {re.escape(str(run))}/\S+: no space left on {re.escape(str(disk))} "
                           r"\(\d+ bytes needed.*")
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_legacy_runs_snapshots_folder_keeps_a_users_file(cli, earlier: Path, tmp_path: Path) -> None:
    """A run from before run.json owns only its epoch_NNN snapshots: a user's note there is foreign,
    so even --overwrite leaves it (and the folder) as they are."""
    run = _copy(earlier, tmp_path / "run")
    (run / "run.json").unlink()
    (run / "snapshots").mkdir(exist_ok=True)
    (run / "snapshots" / "notes.txt").write_text("mine\n")
    before = _snapshot(run)
    result = cli("train", *QUICK, "-o", run, "--overwrite")
    _one_error(result, rf"error: {re.escape(str(run / 'snapshots' / 'notes.txt'))}: was not written by a "
                       r"convscope run .*")
    assert _snapshot(run) == before


def test_resume_keeps_a_users_hidden_tmp_file(cli, earlier: Path, tmp_path: Path) -> None:
    """After a kill, resume removes only convscope's own temporary files of dead processes."""
    run = _copy(earlier, tmp_path / "run")
    (run / ".draft.tmp").write_text("mine\n")
    (run / ".last.pt.convscope-999999999-abc.tmp").write_bytes(b"half")  # a dead writer's leftover
    resumed = cli("train", "-o", run, "--resume", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert (run / ".draft.tmp").read_text() == "mine\n"
    assert not (run / ".last.pt.convscope-999999999-abc.tmp").exists()
