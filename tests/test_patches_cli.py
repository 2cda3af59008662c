"""``convscope patches`` end to end, in real subprocesses: kill -9 and --resume, torchrun with two
gloo processes, bad files, empty data."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from convscope.training.data import fashion_mnist_available, fashion_mnist_dir, read_idx


def write_idx(folder: Path, count: int) -> Path:
    """A Fashion-MNIST-like train split of ``count`` images (the real test images when installed)."""
    if fashion_mnist_available():
        source = fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz"
        pixels = read_idx(source if source.exists() else source.with_suffix(""))[:count]
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", *pixels.shape) + pixels.tobytes())
    return folder


def run_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CONVSCOPE_FASHION_MNIST"] = str(data_dir)
    env.pop("CONVSCOPE_DEBUG", None)
    return env


BASE = ["patches", "fashion-mnist", "--model", "zfnet_mnist", "--weights", "random", "--seed", "1",
        "--layer", "conv1", "--layer", "conv4", "--channels", "0-5", "--device", "cpu"]


def convscope(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convscope", *args], check=False, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path) -> None:
    data = write_idx(tmp_path / "fm", 600)
    env = run_env(data)
    args = [*BASE, "-b", "8", "--no-projections"]
    whole = convscope([*args, "-o", str(tmp_path / "whole")], env)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    state = out / ".patches-state" / "state-rank0-of-1.pt"
    process = subprocess.Popen([sys.executable, "-m", "convscope", *args, "--checkpoint-every", "3", "-o", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    assert not (out / "patches.json").exists() and not (out / "manifest.json").exists()
    position = torch.load(state, weights_only=True)["position"]
    assert 0 < position < 600  # killed in the middle of the pass

    resumed = convscope([*args, "-o", str(out), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "patches.json").read_bytes() == (tmp_path / "whole" / "patches.json").read_bytes()
    assert not state.parent.exists()  # finished: the state is gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert "patches.json" in manifest["files"] and "conv4/channel_5.png" in manifest["files"]

    other = convscope([*args, "--top", "4", "-o", str(tmp_path / "whole"), "--resume"], env)
    assert other.returncode == 0  # no state left: a clean start, not an error


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path) -> None:
    from convscope.dataset.patches import top_patches
    from convscope.errors import BadArgument
    from convscope.models.load import load_model

    model = load_model("zfnet_mnist", "random")
    images = torch.randn(10, 1, 28, 28)
    first = top_patches(model, images, ["conv2"], top=3, batch_size=4, checkpoint=tmp_path)
    again = top_patches(model, images, ["conv2"], top=3, batch_size=4, checkpoint=tmp_path, resume=True)
    assert again == first  # a finished state resumes to the same index without mining again
    with pytest.raises(BadArgument, match="other settings .*top"):
        top_patches(model, images, ["conv2"], top=5, batch_size=4, checkpoint=tmp_path, resume=True)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one(tmp_path) -> None:
    data = write_idx(tmp_path / "fm", 301)  # odd: the shards differ in size, batches do not divide them
    env = run_env(data)
    args = [*BASE, "-b", "16", "--top", "5"]
    single = convscope([*args, "-o", str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "convscope", *args, "-o", str(tmp_path / "two")]
    double = subprocess.run(launcher, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "on 2 processes" in double.stdout
    assert (tmp_path / "two" / "patches.json").read_bytes() == (tmp_path / "one" / "patches.json").read_bytes()
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["options"]["processes"] == 2
    assert sorted(manifest["files"]) == sorted(json.loads((tmp_path / "one" / "manifest.json").read_text())["files"])


def test_bad_files_are_listed_and_the_run_completes(tmp_path, photo) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, size in enumerate([(40, 30), (32, 32), (50, 64)]):
        photo.resize(size).save(folder / f"good{i}.png")
    photo.resize((36, 36)).save(folder / "sub" / "good3.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    listing = tmp_path / "list.txt"
    listing.write_text("# a list\nphotos/good0.png\n\nphotos/missing.jpg\n")
    env = run_env(tmp_path)
    args = ["--model", "alexnet_cifar", "--weights", "random", "--layer", "conv2", "--channels", "0,3",
            "--top", "3", "-b", "2", "--device", "cpu"]

    run = convscope(["patches", str(folder), *args, "-o", str(tmp_path / "out")], env)
    assert run.returncode == 2 and (tmp_path / "out" / "patches.json").exists(), run.stderr
    document = json.loads((tmp_path / "out" / "patches.json").read_text())
    assert document["images"] == 4
    assert {Path(s["path"]).name: s["error"] for s in document["skipped"]} == {
        "empty.jpg": "empty file (0 bytes)", "broken.png": "not an image: cannot identify the format"}
    assert document["channels"] == {"conv2": [0, 3]}
    assert [len(entries) for entries in document["layers"]["conv2"]] == [3, 3]
    assert "skipped 2 unreadable images" in run.stderr and "Traceback" not in run.stderr
    for name in ("conv2/channel_0.png", "conv2/channel_3.png", "index.html", "manifest.json"):
        assert (tmp_path / "out" / name).is_file(), name
    page = (tmp_path / "out" / "index.html").read_text()
    assert 'src="conv2/channel_3.png"' in page and "http" not in page

    from_list = convscope(["patches", str(listing), *args, "--workers", "1", "-o", str(tmp_path / "out2")], env)
    assert from_list.returncode == 2
    document = json.loads((tmp_path / "out2" / "patches.json").read_text())
    assert document["images"] == 1 and document["skipped"][0]["error"] == "no such file"


def test_empty_dataset_is_one_line_and_exit_2(tmp_path) -> None:
    (tmp_path / "nothing").mkdir()
    run = convscope(["patches", str(tmp_path / "nothing"), "--model", "tiny", "--layer", "features.1",
                     "-o", str(tmp_path / "out")], run_env(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "empty dataset" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_torchrun_resume_after_sigkill_equals_one_process(tmp_path) -> None:
    data = write_idx(tmp_path / "fm", 600)
    env = run_env(data)
    args = [*BASE, "-b", "8", "--top", "4", "--no-projections"]
    single = convscope([*args, "-o", str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "convscope", *args, "-o", str(out)]
    states = [out / ".patches-state" / f"state-rank{r}-of-2.pt" for r in range(2)]
    process = subprocess.Popen([*launcher, "--checkpoint-every", "3"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not all(s.exists() for s in states) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks
    process.wait()
    assert not (out / "patches.json").exists()
    positions = [torch.load(s, weights_only=True)["position"] for s in states]
    assert 0 < positions[0] < 300 and 300 < positions[1] < 600  # each rank stopped inside its own shard
    resumed = subprocess.run([*launcher, "--resume"], env=env, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "patches.json").read_bytes() == (tmp_path / "one" / "patches.json").read_bytes()
