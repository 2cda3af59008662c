"""``convscope patches`` never deletes, mixes or overwrites what it did not make (issue 21).

Each test pins one finding: the state folder is convscope's only when marked (3), channel ranges
are bounded before any list is built (4), a resumed run refuses other weights (6) or other images
(7), ``-o`` is checked before mining (10), and the gallery links the files actually written (20).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convscope.cli.main import app

runner = CliRunner()
TINY = ["-m", "tiny", "-w", "random", "--layer", "features.1", "--device", "cpu"]
ENV = {**os.environ, "CONVSCOPE_DEBUG": "0"}


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(generator.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def invoke(*args: object) -> tuple[int, list[str], str]:
    """Run the CLI in this process: exit code, the non-empty stderr lines, stdout."""
    result = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines, result.stdout


def one_error(code: int, lines: list[str], pattern: str) -> str:
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert "Traceback" not in lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``, relative, with file bytes (``None`` for folders)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def interrupt_after_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next mining stop like Ctrl-C right after its final checkpoint."""
    import convscope.dataset.patches as miner

    def stop(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(miner, "_finish", stop)


# -- finding 3: the state folder -------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_users_state_folder_is_refused_before_mining_and_left_alone(photos, tmp_path, resume) -> None:
    out = tmp_path / "out"
    users = out / ".patches-state"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("my notes")
    (users / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (users / "state-rank0-of-1.pt").write_bytes(b"not a checkpoint")
    before = snapshot(users)
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", "0-2", "-o", out,
                            *(["--resume"] if resume else []))
    one_error(code, lines, rf"error: {re.escape(str(users))}: exists and was not made by convscope .*")
    assert snapshot(users) == before
    assert not (out / "patches.json").exists() and not (out / "manifest.json").exists()


def test_a_finished_run_removes_only_its_own_state_files(photos, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_saving(patch)
        code, _, _ = invoke("patches", photos, *TINY, "--channels", "0-2", "-o", out)
    assert code == 130
    state = out / ".patches-state"
    assert (state / "state-rank0-of-1.pt").is_file()
    (state / "mine.txt").write_text("put here by the user")
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", "0-2", "-o", out, "--resume")
    assert code == 0, lines
    assert (out / "patches.json").is_file()
    assert not (state / "state-rank0-of-1.pt").exists()
    assert (state / "mine.txt").read_text() == "put here by the user"
    assert any("mine.txt" in line and line.startswith("warning:") for line in lines), lines


def test_a_normal_run_leaves_no_state_folder(photos, tmp_path) -> None:
    out = tmp_path / "out"
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", "0-2", "-o", out)
    assert code == 0, lines
    assert not (out / ".patches-state").exists()


def test_a_failed_run_leaves_no_empty_state_folder(photos, tmp_path) -> None:
    out = tmp_path / "out"
    code, lines, _ = invoke("patches", photos, "-m", "tiny", "-w", "random", "--layer", "no.such.layer",
                            "-o", out)
    assert code == 2, lines
    assert not (out / ".patches-state").exists()


def test_release_removes_only_listed_state_files_of_a_marked_folder(tmp_path) -> None:
    from convscope.dataset.state import STATE_MARKER, claim_state_folder, release_state_folder
    from convscope.errors import OutputError

    folder = tmp_path / "state"
    run = claim_state_folder(folder, processes=2)
    marker = json.loads((folder / STATE_MARKER).read_text())
    assert marker["run"] == run and marker["files"] == ["state-rank0-of-2.pt", "state-rank1-of-2.pt"]
    assert claim_state_folder(folder, processes=1, resume=True) == run  # resumed: the same run
    (folder / "state-rank1-of-2.pt").write_bytes(b"state")
    assert release_state_folder(folder, only_if_unused=True) == [] and (folder / "state-rank1-of-2.pt").exists()
    # A damaged marker that names other files cannot make it delete them.
    (folder / "notes.txt").write_text("mine")
    marker = json.loads((folder / STATE_MARKER).read_text())
    (folder / STATE_MARKER).write_text(json.dumps({**marker, "files": [*marker["files"], "notes.txt", "../x"]}))
    (tmp_path / "x").write_text("outside")
    assert release_state_folder(folder) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine" and (tmp_path / "x").read_text() == "outside"
    assert not (folder / "state-rank1-of-2.pt").exists()
    (folder / "notes.txt").unlink()
    assert release_state_folder(folder) == [] and not folder.exists()

    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "a-link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("a-file", "a-link"):
        with pytest.raises(OutputError, match=r"exists and was not made by convscope \(it is not a folder\)"):
            claim_state_folder(tmp_path / name)
        assert release_state_folder(tmp_path / name) == []
    assert (tmp_path / "a-file").read_text() == "keep" and list((tmp_path / "elsewhere").iterdir()) == []


# -- finding 4: channel ranges are bounded before building anything -----------------------------


def _limit_memory() -> None:
    # 4 GB of address space: enough for torch, far from what building the range would take.
    resource.setrlimit(resource.RLIMIT_AS, (4_000_000_000, 4_000_000_000))


def test_a_huge_channel_range_is_one_line_without_building_it(photos, tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "convscope", "patches", str(photos), *TINY, "--channels", "0-99999999999",
         "-o", str(tmp_path / "x")],
        capture_output=True, text=True, env=ENV, timeout=120, check=False, preexec_fn=_limit_memory,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    one_error(run.returncode, lines, r"error: --channels 0-99999999999: channel 99999999999 .*")
    assert "memory" not in lines[0]


@pytest.mark.parametrize("spec", ["²", "١", "1_0", "0-١٢", "3-1", "0-", "99999999999999999999999", "a-b", ""])
def test_channel_specs_that_are_not_ascii_ids_are_one_line(photos, tmp_path, spec) -> None:
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", spec, "-o", tmp_path / "out")
    one_error(code, lines, rf"error: --channels {re.escape(spec)}: .*")
    assert not (tmp_path / "out" / "patches.json").exists()


def run_limited(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a Python of its own with 4 GB of address space: a regression fails there, not here."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120,
                          check=False, preexec_fn=_limit_memory)


def test_parse_channels_checks_ranges_before_building_them() -> None:
    from convscope.cli.patches_cmd import MAX_CHANNELS, parse_channels

    assert parse_channels(f"0-{MAX_CHANNELS - 1}") == list(range(MAX_CHANNELS))
    assert parse_channels(" 7, 1-2 ,") == [1, 2, 7]
    done = run_limited(
        "from convscope.cli.patches_cmd import parse_channels\n"
        "from convscope.errors import BadArgument\n"
        "try:\n"
        f"    parse_channels('0-{10**15}')\n"
        "except BadArgument as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"--channels 0-{10**15}: channel {10**15} must be between 0 and"), done.stdout


def test_library_channel_ids_are_checked_against_the_layer_lazily() -> None:
    done = run_limited(
        "import torch\n"
        "from convscope.dataset.patches import top_patches\n"
        "from convscope.errors import BadArgument\n"
        "from convscope.models.load import load_model\n"
        "try:\n"
        "    top_patches(load_model('tiny', 'random'), torch.randn(3, 3, 32, 32), ['features.1'],"
        f" channels=range({10**15}))\n"
        "except BadArgument as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(r"--channels \d+: is out of range: layer features.1 has \d+ channels \(0\.\.\d+\)\n",
                        done.stdout), done.stdout


def test_a_huge_top_does_not_allocate_a_huge_table(photos, tmp_path) -> None:
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", "0", "--top", "99999999999",
                            "--no-projections", "-o", tmp_path / "out")
    assert code == 0, lines
    document = json.loads((tmp_path / "out" / "patches.json").read_text())
    assert len(document["layers"]["features.1"][0]) == 4  # every image, once


# -- finding 6: --resume with other weights -------------------------------------------------------


def test_resume_refuses_weights_replaced_at_the_same_path(photos, tmp_path, monkeypatch) -> None:
    from convscope.models.load import load_model

    weights = tmp_path / "weights.pt"
    torch.save(load_model("tiny", "random", seed=0).module.state_dict(), weights)
    out = tmp_path / "out"
    args = ["patches", photos, "-m", "tiny", "-w", weights, "--layer", "features.1", "--channels", "0-2",
            "--device", "cpu", "-o", out]
    with monkeypatch.context() as patch:
        interrupt_after_saving(patch)
        assert invoke(*args)[0] == 130
    torch.save(load_model("tiny", "random", seed=1).module.state_dict(), weights)
    state = out / ".patches-state"
    before = snapshot(state)
    code, lines, _ = invoke(*args, "--resume")
    one_error(code, lines, r"error: --resume: the checkpoint .* was made with other weights \(sha256 [0-9a-f]{12}, "
                           r"now [0-9a-f]{12}\) \(run again without --resume to start over\)")
    assert not (out / "patches.json").exists()
    assert snapshot(state) == before  # kept: the right weights can still resume it


def test_library_resume_refuses_a_model_with_other_weights(tmp_path) -> None:
    from convscope.dataset.patches import top_patches
    from convscope.errors import BadArgument
    from convscope.models.load import load_model

    images = torch.randn(5, 3, 32, 32)
    model = load_model("tiny", "random", seed=0)
    top_patches(model, images, ["features.1"], top=2, batch_size=2, checkpoint=tmp_path)
    kept = {name: tensor.clone() for name, tensor in model.module.state_dict().items()}
    with torch.no_grad():  # same name, same weights argument, other numbers: two models in one result
        next(model.module.parameters()).add_(1.0)
    with pytest.raises(BadArgument, match="made with other weights"):
        top_patches(model, images, ["features.1"], top=2, batch_size=2, checkpoint=tmp_path, resume=True)
    model.module.load_state_dict(kept)
    again = top_patches(model, images, ["features.1"], top=2, batch_size=2, checkpoint=tmp_path, resume=True)
    assert again == top_patches(model, images, ["features.1"], top=2, batch_size=2)


# -- finding 7: --resume over other images ---------------------------------------------------------


def test_resume_refuses_a_changed_image_folder(photos, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    args = ["patches", photos, *TINY, "--channels", "0-2", "-b", "2", "-o", out]
    with monkeypatch.context() as patch:
        interrupt_after_saving(patch)
        assert invoke(*args)[0] == 130
    (photos / "im1.png").rename(tmp_path / "im1.png")  # one image leaves, another comes: same count
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photos / "im9.png")
    code, lines, _ = invoke(*args, "--resume")
    one_error(code, lines, r"error: --resume: the images changed since the checkpoint .* was made \(.*\) "
                           r"\(run again without --resume to start over\)")
    assert not (out / "patches.json").exists()


def test_resume_refuses_an_image_rewritten_in_place(tmp_path) -> None:
    from convscope.dataset.patches import top_patches
    from convscope.errors import BadArgument
    from convscope.models.load import load_model

    listing = tmp_path / "list.txt"
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    listing.write_text("0.png\n1.png\n2.png\n")
    model = load_model("tiny", "random")
    top_patches(model, listing, ["features.1"], top=2, batch_size=2, checkpoint=tmp_path / "state")
    Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(tmp_path / "1.png")
    os.utime(tmp_path / "1.png", ns=(0, 0))
    with pytest.raises(BadArgument, match="the images changed"):
        top_patches(model, listing, ["features.1"], top=2, batch_size=2, checkpoint=tmp_path / "state", resume=True)


# -- finding 10: -o is checked first -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "devnull"])
def test_bad_output_is_one_line_before_mining(photos, tmp_path, monkeypatch, kind) -> None:
    import convscope.dataset.patches as miner

    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    target = existing if kind == "file" else Path("/dev/null")

    def no_mining(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("mined before checking -o")

    monkeypatch.setattr(miner, "top_patches", no_mining)
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", "0", "-o", target)
    one_error(code, lines, rf"error: {re.escape(str(target))}: exists and is not a folder .*")
    assert existing.read_text() == "keep me"


# -- finding 20: links follow the names OutputDir chose --------------------------------------------


def test_gallery_links_the_files_written_not_the_users(photos, tmp_path) -> None:
    out = tmp_path / "out"
    (out / "features.1").mkdir(parents=True)
    (out / "features.1" / "channel_0.png").write_bytes(b"the user's picture")
    (out / "index.html").write_text("<p>the user's page</p>")
    code, lines, _ = invoke("patches", photos, *TINY, "--channels", "0,1", "--no-projections", "-o", out)
    assert code == 0, lines
    assert (out / "features.1" / "channel_0.png").read_bytes() == b"the user's picture"
    assert (out / "index.html").read_text() == "<p>the user's page</p>"
    page = (out / "index_2.html").read_text()
    links = set(re.findall(r'(?:src|href)="([^"#]+)"', page))
    assert links == {"features.1/channel_0_2.png", "features.1/channel_1.png"}
    assert (out / "features.1" / "channel_0_2.png").read_bytes().startswith(b"\x89PNG")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"features.1/channel_0_2.png", "features.1/channel_1.png", "index_2.html"} <= set(manifest["files"])


def test_gallery_has_no_link_for_a_channel_without_a_picture() -> None:
    from convscope.render.patches import gallery_html

    page = gallery_html("t", {"conv1": [{"channel": 0, "picture": None, "best": None, "count": 0},
                                        {"channel": 1, "picture": "conv1/channel_1.png", "best": 1.0, "count": 1}]})
    assert re.findall(r'(?:src|href)="([^"#]+)"', page) == ["conv1/channel_1.png", "conv1/channel_1.png"]
    assert "channel 0 &middot; no patches" in page
