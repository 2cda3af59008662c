"""Issue 21: ``explore --target``, file names that are not UTF-8, and full disks outside training.

- A ``--target`` that only looks like a number (``²``, Arabic-Indic digits, a sign) is one
  ``error:`` line, not a traceback or a silently different class.
- A photo whose name is not valid UTF-8 is read by its real bytes; wherever its name is shown
  (the HTML report, JSON, stdout and stderr lines) the bad bytes are U+FFFD.
- A full disk is ``error: <file>: no space left on <mount> (N bytes needed)``, exit 2, and
  nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import skimage_photo
from PIL import Image
from typer.testing import CliRunner

from convscope.cli.main import app

TINY = ["--model", "tiny", "--weights", "random"]
ENV = {"CONVSCOPE_DEBUG": "0"}
runner = CliRunner()
# A name that is not UTF-8: Latin-1 "café.jpg". Python spells its bytes with a lone surrogate.
BAD_NAME = os.fsdecode(b"caf\xe9.jpg")
SHOWN_NAME = "caf\ufffd.jpg"


def invoke(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def one_error_line(result: Any, pattern: str) -> str:
    """The CLI's answer is exit 2 and exactly one stderr line matching ``pattern``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output
    return str(lines[0])


def bad_photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BAD_NAME
    Image.open(skimage_photo("chelsea.png")).convert("RGB").resize((96, 64)).save(path, format="JPEG")
    assert os.fsencode(path).endswith(b"/caf\xe9.jpg")
    return path


def strings(value: Any) -> set[str]:
    """Every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set(value).union(*map(strings, value.values()))
    if isinstance(value, list):
        return set().union(*map(strings, value))
    return set()


def good_photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cat.png"
    Image.open(skimage_photo("chelsea.png")).convert("RGB").resize((96, 64)).save(path)
    return path


# ---------------------------------------------------------------- finding 8: explore --target


@pytest.mark.parametrize("text", ["²", "١٢", "-5", "+3"])
def test_explore_target_that_only_looks_like_a_number_is_one_error_line(text: str, tmp_path: Path) -> None:
    # int("١٢") is 12 and "²".isdigit() is true: before, ² was a traceback and ١٢ explored class 12.
    report = tmp_path / "report.html"
    result = invoke("explore", good_photo(tmp_path / "in"), *TINY, "-o", report, "--target", text)
    one_error_line(result, rf"error: --target {re.escape(text)}: is not a class index: use the digits 0-9 only, "
                           r"no sign \(0 is the first class\)")
    assert not report.exists()


def test_explore_target_by_index_and_by_label_still_work(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    for target in (" 7 ", "horse"):  # tiny's class 7 is 'horse'
        result = invoke("explore", good_photo(tmp_path / "in"), *TINY, "-o", report, "--target", target)
        assert result.exit_code == 0, result.output
        assert "Grad-CAM for horse (class 7" in report.read_text(encoding="utf-8")


# ---------------------------------------------------------------- finding 11: names that are not UTF-8


def test_explore_a_photo_whose_name_is_not_utf8(tmp_path: Path) -> None:
    photo = bad_photo(tmp_path / "in")
    report = tmp_path / "report.html"
    result = invoke("explore", photo, *TINY, "-o", report)
    assert result.exit_code == 0, (result.output, result.exception)
    html = report.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    assert f"<title>convscope: {SHOWN_NAME} through tiny</title>" in html
    assert f"What tiny sees in {SHOWN_NAME}" in html
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{os.fsencode(photo.parent).decode()}/{SHOWN_NAME}: "), first
    assert result.stdout.splitlines()[-1] == f"wrote {report}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "report.html"]


def test_gradcam_of_a_photo_whose_name_is_not_utf8_on_a_strict_utf8_terminal(tmp_path: Path) -> None:
    """The real console: stdout strict UTF-8 (as under an en_US.UTF-8 locale), JSON and manifest."""
    photo = bad_photo(tmp_path / "in")
    missing = tmp_path / "in" / os.fsdecode(b"gone\xff.jpg")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "convscope", "gradcam", str(photo), str(missing), *TINY, "-o", str(out)],
        capture_output=True, env={**os.environ, **ENV, "PYTHONIOENCODING": "utf-8:strict"}, timeout=240, check=False,
    )
    stdout, stderr = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")  # strict: no raw bytes
    assert "Traceback" not in stderr, stderr
    folder = os.fsencode(photo.parent).decode()
    assert stderr.splitlines() == [f"error: {folder}/gone\ufffd.jpg: no such file"]
    assert stdout.splitlines()[0].startswith(f"{folder}/{SHOWN_NAME}: explaining "), stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "caf__gradcam.png", "caf__gradcam_map.png", "gradcam.json", "manifest.json"]
    for name in ("gradcam.json", "manifest.json"):
        text = (out / name).read_text(encoding="utf-8")
        assert "\\udc" not in text.lower(), name  # no lone surrogates, which strict JSON parsers reject
        assert f"{folder}/{SHOWN_NAME}" in strings(json.loads(text)), name
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["inputs"] == {f"{folder}/{SHOWN_NAME}": ["caf__gradcam.png", "caf__gradcam_map.png"]}


# ---------------------------------------------------------------- finding 12: full disk


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_explore_on_a_full_disk_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = good_photo(tmp_path / "in")
    out = tmp_path / "out"
    report = out / "report.html"
    earlier = invoke("explore", photo, *TINY, "-o", report)
    assert earlier.exit_code == 0, earlier.output
    before = report.read_bytes()
    monkeypatch.setattr(os, "fsync", _no_space)  # where NFS and delayed allocation report it
    result = invoke("explore", photo, *TINY, "-o", report)
    one_error_line(result, rf"error: {re.escape(str(report))}: no space left on /\S* \(\d{{5,}} bytes needed\)"
                           r" \(free some space and run again\)")
    assert report.read_bytes() == before  # the earlier report is intact, byte for byte
    assert os.listdir(out) == ["report.html"]  # no temporary file left


def test_output_dir_journal_on_a_full_disk_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal is the one file of ``OutputDir`` not written by ``atomic_write``."""
    from convscope.cli import output

    real_open = open

    class FullFile:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

    def opener(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return FullFile(handle) if "a" in mode and str(file).endswith("journal.tmp") else handle

    monkeypatch.setattr(output, "open", opener, raising=False)
    out = tmp_path / "out"
    result = invoke("gradcam", good_photo(tmp_path / "in"), *TINY, "-o", out)
    one_error_line(result, rf"error: {re.escape(str(out))}/\.manifest\.json\.convscope-\d+-journal\.tmp: "
                           r"no space left on /\S* \(\d+ bytes needed\) \(free some space and run again\)")


def test_a_stray_disk_full_error_is_one_line() -> None:
    """Any ENOSPC that reaches the CLI unwrapped (a write outside the atomic writers) is one line."""
    import typer

    from convscope.cli.errors import GuardedGroup

    tool = typer.Typer(cls=GuardedGroup)

    @tool.command()
    def write(path: str, named: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", *([path] if named else []))

    @tool.command()
    def other() -> None:
        raise OSError(errno.EIO, "Input/output error")

    result = runner.invoke(tool, ["write", "/tmp/x/out.bin"], env=ENV)
    one_error_line(result, r"error: /tmp/x/out.bin: no space left on /\S* \(free some space and run again\)")
    result = runner.invoke(tool, ["write", "/tmp/x/out.bin", "--no-named"], env=ENV)
    one_error_line(result, r"error: output: no space left on device \(free some space and run again\)")
    assert isinstance(runner.invoke(tool, ["other"], env=ENV).exception, OSError)  # a bug stays a bug


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_explore_on_a_real_full_tmpfs(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):  # the tiny report is about 110 kB
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        report = disk / "report.html"
        result = invoke("explore", good_photo(tmp_path / "in"), *TINY, "-o", report)
        one_error_line(result, rf"error: {re.escape(str(report))}: no space left on {re.escape(str(disk))} "
                               r"\(\d+ bytes needed\) \(free some space and run again\)")
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("command", ["explore", "gradcam"])
def test_output_folder_on_a_tmpfs_without_free_inodes(command: str, tmp_path: Path) -> None:
    """No room for one more file: the folder check before any work says so, in the same words."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k,nr_inodes=2"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        (disk / "last-file").touch()
        target = disk / ("report.html" if command == "explore" else "out")
        folder = disk if command == "explore" else target
        result = invoke(command, good_photo(tmp_path / "in"), *TINY, "-o", target)
        one_error_line(result, rf"error: {re.escape(str(folder))}: no space left on {re.escape(str(disk))} "
                               r"\(free some space and run again\)")
        assert os.listdir(disk) == ["last-file"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------- explore -o never replaces a user's file


def test_explore_refuses_a_users_file_that_appeared_during_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-o is checked before the slow part, and again just before writing: a file the user saved
    there meanwhile is never replaced."""
    import convscope.explore

    report = tmp_path / "report.html"
    real = convscope.explore.explore

    def explore_while_the_user_saves(*args: Any, **kwargs: Any) -> Any:
        report.write_text("<html>my notes</html>", encoding="utf-8")
        return real(*args, **kwargs)

    monkeypatch.setattr(convscope.explore, "explore", explore_while_the_user_saves)
    result = invoke("explore", good_photo(tmp_path / "in"), *TINY, "-o", report)
    one_error_line(result, rf"error: {re.escape(str(report))}: exists and was not written by convscope; "
                           r"it is left as it is \(remove it or choose another file name\)")
    assert report.read_text(encoding="utf-8") == "<html>my notes</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "report.html"]
