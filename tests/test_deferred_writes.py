"""Deferred picture writes (``OutputDir.png(..., defer=True)``): the files, their order in the
manifest and the journal, and a failure, are as with plain writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from convscope.cli import output
from convscope.cli.output import OutputDir
from convscope.errors import OutputError


def _picture(value: int) -> np.ndarray:
    return np.full((40, 50, 3), value, np.uint8)


def test_deferred_pictures_are_written_and_recorded_in_call_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = OutputDir(tmp_path / "out")
    names = [f"p{i}.png" for i in range(9)]
    for i, name in enumerate(names):
        out.png(name, _picture(i * 20), defer=True)
    out.json("x.json", {"a": 1})  # waits for the pictures first
    assert out.written == [*names, "x.json"]
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)), _picture(i * 20))
    out.manifest("test", {})
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(names) <= set(manifest["files"]) and manifest["complete"]


def test_a_taken_name_is_claimed_before_the_deferred_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "mine.png").write_bytes(b"the user's file")
    out = OutputDir(folder)
    path = out.png("mine.png", _picture(1), defer=True)
    out.flush()
    assert path.name == "mine_2.png" and (folder / "mine.png").read_bytes() == b"the user's file"


def test_a_failed_deferred_write_raises_one_output_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = OutputDir(tmp_path / "out")

    def full(target, data):  # type: ignore[no-untyped-def]
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(output, "atomic_write", full)
    out.png("a.png", _picture(3), defer=True)
    with pytest.raises(OutputError, match="a.png: cannot write: no space left on device"):
        out.flush()
    assert out.written == []
