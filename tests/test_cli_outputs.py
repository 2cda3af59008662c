"""Outputs never clobber anything (issue 8, items 1-3 and 6): names, ownership, manifests, locks.

The CLI cases run the real console entry point in subprocesses, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import skimage_photo
from PIL import Image
from typer.testing import CliRunner

from convscope.cli.main import app
from convscope.cli.output import OutputDir, shorten, unique_stems

TINY = ["--model", "tiny", "--weights", "random"]
ENV = {**os.environ, "CONVSCOPE_DEBUG": "0"}


def convscope(*args: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convscope", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(done: subprocess.CompletedProcess[str], start: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(start), lines[0]
    assert "Traceback" not in done.stderr and "╭" not in done.stderr
    return lines[0]


def photo(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(skimage_photo(name)).convert("RGB").save(target)
    return target


@pytest.fixture()
def same_stems(tmp_path: Path) -> Path:
    """a/cat.jpg, a/cat.png and b/cat.png: three different photos with one stem."""
    photo("chelsea.png", tmp_path / "in" / "a" / "cat.jpg")
    photo("coffee.png", tmp_path / "in" / "a" / "cat.png")
    photo("astronaut.png", tmp_path / "in" / "b" / "cat.png")
    return tmp_path / "in"


def test_same_stem_inputs_get_distinct_outputs(same_stems: Path, tmp_path: Path) -> None:
    before = checksums(same_stems)
    out = tmp_path / "out"
    done = convscope("gradcam", same_stems, "-o", out, *TINY)
    assert done.returncode == 0, done.stderr
    records = json.loads((out / "gradcam.json").read_text())
    assert len(records) == 3
    files = [name for record in records for name in record["files"]]
    assert len(files) == len(set(files)) == 6  # overlay + map per input, none shared
    for name in files:
        assert (out / name).is_file()
    assert {r["files"][0] for r in records} == {"a_cat_jpg_gradcam.png", "a_cat_png_gradcam.png", "b_cat_png_gradcam.png"}
    # Distinct photos -> distinct overlays: nothing was written over another input's result.
    assert len({hashlib.sha256((out / r["files"][0]).read_bytes()).digest() for r in records}) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert {Path(k).relative_to(same_stems).as_posix() for k in manifest["inputs"]} == {"a/cat.jpg", "a/cat.png", "b/cat.png"}
    assert sorted(f for v in manifest["inputs"].values() for f in v) == sorted(files)
    written = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert done.stdout.strip().endswith(f"wrote {len(written)} files to {out}")
    assert checksums(same_stems) == before


def test_output_into_the_input_folder_leaves_the_users_files_alone(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    photo("chelsea.png", folder / "chelsea.png")
    photo("coffee.png", folder / "chelsea_gradcam.png")  # the user's own picture
    before = checksums(folder)
    done = convscope("gradcam", folder, "-o", folder, *TINY)
    assert done.returncode == 0, done.stderr
    after = checksums(folder)
    assert {k: after[k] for k in before} == before  # no input or user file changed
    records = {Path(r["image"]).name: r for r in json.loads((folder / "gradcam.json").read_text())}
    assert records["chelsea.png"]["files"][0] == "chelsea_gradcam_2.png"
    assert records["chelsea_gradcam.png"]["files"][0] == "chelsea_gradcam_gradcam.png"
    assert f"warning: {folder / 'chelsea_gradcam.png'}: is an input of this run" in done.stderr
    # A rerun replaces its own earlier outputs (recorded with their checksums), never the user's.
    again = convscope("gradcam", folder / "chelsea.png", "-o", folder, *TINY)
    assert again.returncode == 0, again.stderr
    assert json.loads((folder / "gradcam.json").read_text())[0]["files"][0] == "chelsea_gradcam_2.png"
    assert checksums(folder)["chelsea_gradcam.png"] == before["chelsea_gradcam.png"]
    assert not (folder / "chelsea_gradcam_3.png").exists()


def test_a_users_file_with_an_output_name_is_never_replaced(tmp_path: Path) -> None:
    image = photo("chelsea.png", tmp_path / "in" / "cat.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat_activations.png").write_bytes(b"the user's file")
    done = convscope("activations", image, "-o", out, *TINY)
    assert done.returncode == 0, done.stderr
    assert (out / "cat_activations.png").read_bytes() == b"the user's file"
    assert (out / "cat_activations_2.png").is_file()
    warning = f"warning: {out / 'cat_activations.png'}: exists and was not written by convscope, left as it is; " \
              "wrote cat_activations_2.png"
    assert warning in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "cat_activations_2.png" in manifest["files"] and "cat_activations.png" not in manifest["files"]


def test_second_command_merges_into_the_manifest(tmp_path: Path) -> None:
    image = photo("chelsea.png", tmp_path / "cat.png")
    out = tmp_path / "out"
    assert convscope("activations", image, "-o", out, *TINY).returncode == 0
    first = json.loads((out / "manifest.json").read_text())
    assert convscope("filters", "-o", out, *TINY).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [run["command"] for run in manifest["runs"]] == ["activations", "filters"]
    assert set(first["files"]) < set(manifest["files"])
    assert "filters_features.0.png" in manifest["files"]
    assert set(manifest["files"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from convscope.cli.output import OutputDir
    from convscope.imageio import atomic_path
    out = OutputDir(sys.argv[1])
    out.png("cat_activations.png", np.zeros((4, 4), np.uint8))
    with atomic_path(os.path.join(sys.argv[1], "half.png")) as temp:
        temp.write_bytes(b"half a picture")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_rerun_leaves_no_complete_manifest_and_its_temp_files_are_cleaned(tmp_path: Path) -> None:
    image = photo("chelsea.png", tmp_path / "cat.png")
    out = tmp_path / "out"
    assert convscope("activations", image, "-o", out, *TINY).returncode == 0
    (out / ".notes.tmp").write_text("not convscope's")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=ENV, capture_output=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False  # marked before the killed run wrote its first file
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp") and p.name != ".notes.tmp"]
    journal = f".manifest.json.convscope-{killed_pid(out)}-journal.tmp"
    leftovers = [name for name in leftovers if name != journal]
    assert len(leftovers) == 1 and leftovers[0].startswith(".half.png.convscope-")
    live = out / f".x.png.convscope-{os.getpid()}-abc.tmp"  # a writer that is still running
    live.write_bytes(b"")
    rerun = convscope("activations", image, "-o", out, *TINY)
    assert rerun.returncode == 0, rerun.stderr
    names = {p.name for p in out.iterdir()}
    assert leftovers[0] not in names and journal not in names
    assert ".notes.tmp" in names and live.name in names
    # The killed run's journal says cat_activations.png was convscope's: replaced, not numbered around.
    assert "warning" not in rerun.stderr and "cat_activations_2.png" not in names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and "running" not in manifest
    assert set(manifest["files"]) == {p.name for p in out.iterdir() if not p.name.startswith(".")} - {"manifest.json"}


def killed_pid(folder: Path) -> int:
    journals = list(folder.glob(".manifest.json.convscope-*-journal.tmp"))
    assert len(journals) == 1
    return int(journals[0].name.split("-")[-2])


def test_journal_of_a_killed_run_survives_a_second_kill(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for _ in range(2):
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=ENV, capture_output=True,
                                timeout=120, check=False)
        assert killed.returncode == -signal.SIGKILL
    # The second killed run replaced the first one's file as its own; one journal is left, naming it.
    entries = [json.loads(line) for line in (out / f".manifest.json.convscope-{killed_pid(out)}-journal.tmp")
               .read_text().splitlines()]
    assert {e["name"] for e in entries} == {"cat_activations.png"}
    assert not (out / "cat_activations_2.png").exists()


def test_overlong_input_names_are_shortened_with_a_hash(tmp_path: Path) -> None:
    first = photo("chelsea.png", tmp_path / ("c" * 245 + "1.png"))
    second = photo("coffee.png", tmp_path / ("c" * 245 + "2.png"))
    out = tmp_path / "out"
    done = convscope("gradcam", first, second, "-o", out, *TINY)
    assert done.returncode == 0, done.stderr
    records = json.loads((out / "gradcam.json").read_text())
    names = [name for record in records for name in record["files"]]
    assert len(set(names)) == 4
    assert all(len(name.encode()) <= 200 and (out / name).is_file() for name in names)


def test_unique_stems_rules() -> None:
    paths = [Path("x/a/cat.jpg"), Path("x/a/cat.png"), Path("x/b/cat.png"), Path("dog.jpg"), Path("x/Dog.png")]
    assert unique_stems(paths) == ["a_cat_jpg", "a_cat_png", "b_cat_png", "dog", "x_Dog"]
    assert unique_stems([Path("a/cat.jpg"), Path("b/cat.jpg")]) == ["a_cat", "b_cat"]
    assert unique_stems([Path("cat.jpg"), Path("cat.jpg")]) == ["cat_jpg", "cat_jpg_2"]
    long = "é" * 200 + ".png"
    cut = shorten(long)
    assert len(cut.encode()) <= 200 and cut.endswith(".png") and shorten(long) == cut
    assert shorten("é" * 200 + "x.png") != cut


def test_output_dir_never_writes_a_name_twice(tmp_path: Path) -> None:
    import numpy as np

    out = OutputDir(tmp_path)
    first = out.png("a.png", np.zeros((2, 2), np.uint8))
    second = out.png("a.png", np.ones((2, 2), np.uint8))
    assert (first.name, second.name) == ("a.png", "a_2.png")
    assert out.written == ["a.png", "a_2.png"]
    out.json("values.json", {"nan": float("nan"), "list": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "values.json").read_text()) == {"nan": None, "list": [None, 1.5]}


# ---------------------------------------------------------------- -o that cannot work

runner = CliRunner()
OUTPUT_COMMANDS = {
    "activations": ["activations", "IMAGE", *TINY],
    "features": ["features", "IMAGE", *TINY],
    "filters": ["filters", *TINY],
    "demo": ["demo", "--model", "tiny", "--weights", "random"],
    "gradcam": ["gradcam", "IMAGE", *TINY],
    "guided": ["guided", "IMAGE", *TINY],
    "saliency": ["saliency", "IMAGE", *TINY],
    "deconv": ["deconv", "IMAGE", "--layer", "conv1", *TINY],
    "occlusion": ["occlusion", "IMAGE", *TINY],
    "train": ["train", "--data", "digits", "--arch", "tiny"],
    "evaluate": ["evaluate", "--weights", "random", "--model", "tiny", "--data", "digits"],
    "ablate": ["ablate", "--data", "digits", "--arch", "tiny", "--variant", "drop:conv2"],
}


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
@pytest.mark.parametrize("kind", ["file", "devnull", "proc", "under_a_file"])
def test_bad_output_path_is_one_line_error(command: str, kind: str, tmp_path: Path) -> None:
    image = photo("chelsea.png", tmp_path / "cat.png")
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    target = {"file": existing, "devnull": Path("/dev/null"), "proc": Path("/proc/self/convscope-out"),
              "under_a_file": existing / "out"}[kind]
    args = [str(image) if a == "IMAGE" else a for a in OUTPUT_COMMANDS[command]]
    result = runner.invoke(app, [*args, "-o", str(target)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}: "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert existing.read_text() == "keep me"


def _without_root_powers() -> list[str]:
    """Run as root minus the rights to bypass file permissions (or as is, when not root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.parametrize("command", ["gradcam", "train", "evaluate"])
def test_read_only_output_folder(command: str, tmp_path: Path) -> None:
    image = photo("chelsea.png", tmp_path / "cat.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    args = [str(image) if a == "IMAGE" else a for a in OUTPUT_COMMANDS[command]]
    try:
        done = subprocess.run([*_without_root_powers(), sys.executable, "-m", "convscope", *args, "-o", str(locked)],
                              capture_output=True, text=True, env=ENV, timeout=240, check=False)
    finally:
        locked.chmod(0o755)
    line = one_error_line(done, f"error: {locked}: ")
    assert "not writable: permission denied" in line
    assert list(locked.iterdir()) == []


def test_unreadable_named_file_is_skipped_like_one_in_a_folder(tmp_path: Path) -> None:
    good = photo("chelsea.png", tmp_path / "a.png")
    locked = photo("coffee.png", tmp_path / "locked.png")
    other = photo("astronaut.png", tmp_path / "z.png")
    locked.chmod(0)
    try:
        done = subprocess.run(
            [*_without_root_powers(), sys.executable, "-m", "convscope", "classify", str(good), str(locked), str(other),
             "--json", "--topk", "1", *TINY],
            capture_output=True, text=True, env=ENV, timeout=240, check=False,
        )
    finally:
        locked.chmod(0o644)
    assert one_error_line(done, "error: ") == f"error: {locked}: permission denied, cannot read the file"
    payload = json.loads(done.stdout)
    assert [("error" in entry) for entry in payload] == [False, True, False]


# ---------------------------------------------------------------- the run-folder lock


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def _holder(run: Path) -> dict:
    try:
        return json.loads((run / ".convscope.lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_second_train_into_a_run_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train = ["train", "--data", "digits", "--arch", "tiny", "-b", "24"]
    first = subprocess.Popen([sys.executable, "-m", "convscope", *train, "--epochs", "200", "-o", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        _wait_for(lambda: _holder(run).get("pid") == first.pid)
        second = convscope(*train, "--epochs", "1", "--limit", "48", "-o", run)
        line = one_error_line(second, f"error: {run}: is in use by another convscope train (pid {first.pid}")
        assert "wait for it to finish, or choose another --output" in line
        assert first.poll() is None
    finally:
        first.kill()  # SIGKILL: the lock file still names it, but the kernel has released the lock
        first.wait()
    assert _holder(run)["pid"] == first.pid
    # This test is about the lock, not about resuming: --overwrite replaces the killed run's files.
    third = convscope(*train, "--epochs", "1", "--limit", "48", "--overwrite", "-o", run)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of train pid {first.pid}, which is no longer running" in third.stderr
    assert (run / "last.pt").is_file()
    assert _holder(run) == {}  # released at the end


HOLDER = textwrap.dedent("""
    import sys, time
    from convscope.training.runlock import run_lock
    with run_lock(sys.argv[1], "ablate"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_run_lock_refuses_a_live_holder_in_another_process(tmp_path: Path) -> None:
    from convscope.errors import OutputError
    from convscope.training.runlock import run_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"is in use by another convscope ablate \(pid {holder.pid}"), \
                run_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path) as lock:
        assert lock.previous["pid"] == holder.pid


def test_someone_elses_manifest_json_is_left_alone(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "manifest.json").write_text('{"my": "data"}')
    out = OutputDir(tmp_path)
    out.png("a.png", np.zeros((2, 2), np.uint8))
    out.manifest("test", {})
    assert (tmp_path / "manifest.json").read_text() == '{"my": "data"}'
    assert json.loads((tmp_path / "manifest.convscope.json").read_text())["files"] == ["a.png"]
    again = OutputDir(tmp_path)  # the next run finds its own manifest and owns a.png
    assert again.png("a.png", np.ones((2, 2), np.uint8)).name == "a.png"


def test_manifest_from_before_checksums_still_owns_its_files(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "old.png").write_bytes(b"written by an older convscope")
    (tmp_path / "mine.png").write_bytes(b"the user's")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "command": "activations",
                                                         "options": {}, "files": ["old.png"]}))
    out = OutputDir(tmp_path)
    assert out.png("old.png", np.zeros((2, 2), np.uint8)).name == "old.png"
    assert out.png("mine.png", np.zeros((2, 2), np.uint8)).name == "mine_2.png"
    out.manifest("test", {})
    assert (tmp_path / "mine.png").read_bytes() == b"the user's"


def test_a_failed_command_leaves_no_empty_folder_of_its_own(tmp_path: Path) -> None:
    picture = photo("chelsea.png", tmp_path / "cat.png")
    done = convscope("gradcam", picture, *TINY, "--layer", "nosuch", "-o", tmp_path / "made" / "deeper")
    one_error_line(done, "error: nosuch")
    assert not (tmp_path / "made").exists()  # both folders it created are gone again
    kept = tmp_path / "mine"
    kept.mkdir()
    done = convscope("gradcam", picture, *TINY, "--layer", "nosuch", "-o", kept)
    one_error_line(done, "error: nosuch")
    assert kept.is_dir()  # the user's own (empty) folder stays
    done = convscope("gradcam", picture, tmp_path / "missing.png", *TINY, "-o", tmp_path / "partial")
    assert done.returncode == 2 and any((tmp_path / "partial").iterdir())  # what was written stays
