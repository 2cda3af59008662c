"""Every bad argument is one line and exit code 2 (issue 8, item 5), checked through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import skimage_photo

from convscope.cli.options import check_device
from convscope.errors import BadArgument

TINY = ["--model", "tiny", "--weights", "random"]
ENV = {**os.environ, "CONVSCOPE_DEBUG": "0"}
PHOTO = skimage_photo("chelsea.png")


def convscope(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convscope", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=240, check=False)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in done.stderr and "╭" not in done.stderr and "│" not in done.stderr
    return lines[0]


@pytest.mark.parametrize("fill", ["nan", "inf", "-inf", "NaN"])
def test_occlusion_fill_must_be_finite(fill: str, tmp_path: Path) -> None:
    done = convscope("occlusion", PHOTO, "--fill", fill, "-o", tmp_path / "out", *TINY)
    assert one_error_line(done) == f"error: --fill {fill}: must be grey, black, white or a finite number"
    assert not (tmp_path / "out" / "occlusion.json").exists()


@pytest.mark.parametrize("command", [["classify", str(PHOTO), *TINY], ["train", "--data", "digits", "-o", "unused"]])
def test_seed_beyond_64_bits(command: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "convscope", *command, "--seed", str(2**64)],
                          capture_output=True, text=True, env=ENV, timeout=240, cwd=tmp_path, check=False)
    line = one_error_line(done)
    assert line.startswith("error: --seed: ") and "9223372036854775807" in line
    assert not (tmp_path / "unused").exists()


def test_topk_zero_is_one_line_not_a_usage_box() -> None:
    line = one_error_line(convscope("classify", PHOTO, "--topk", "0", *TINY))
    assert line.startswith("error: --topk/-k: ") and "greater than or equal to 1" in line
    assert line.endswith("(see 'python -m convscope classify --help')")


def test_device_meta_is_one_line() -> None:
    line = one_error_line(convscope("classify", PHOTO, "--device", "meta", *TINY))
    assert line == ("error: --device meta: the 'meta' device holds no data, so nothing can be computed on it "
                    "(use auto, cpu, cuda, cuda:N or mps)")


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:1", "mps", "CPU"])
def test_check_device_accepts_runnable_devices(value: str) -> None:
    assert check_device(value) == value.lower()


@pytest.mark.parametrize("value", ["meta", "tpu", "cuda:", "cuda:x", "cpu:0:1", "", "xla"])
def test_check_device_refuses_others(value: str) -> None:
    # The CLI's message is the library's (models.load.resolve_device): one wording per problem.
    with pytest.raises(BadArgument, match=r"--device \S*: (not a device|the '\w+' device )") as caught:
        check_device(value)
    assert str(caught.value).endswith("(use auto, cpu, cuda, cuda:N or mps)")


# The child reports its own peak memory, so the test sees that nothing big was allocated. VmHWM, not
# ru_maxrss: Linux carries ru_maxrss over execve, so a child of a big pytest process would inherit its peak.
PEAK = textwrap.dedent("""
    import os, sys
    from convscope.cli.app import main
    sys.argv = ["convscope", *sys.argv[2:]]
    try:
        main()
    finally:
        with open("/proc/self/status") as status:
            peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        with open(os.environ["PEAK_FILE"], "w") as f:
            f.write(peak)
""")


@pytest.mark.parametrize("size, gib", [("3,100000,100000", "111.8"), ("3,20000,20000", "4.5")])
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory read from /proc")
def test_summary_refuses_huge_inputs_before_allocating(size: str, gib: str, tmp_path: Path) -> None:
    peak = tmp_path / "peak"
    done = subprocess.run([sys.executable, "-c", PEAK, "-", "summary", *TINY, "--input-size", size],
                          capture_output=True, text=True, env={**ENV, "PEAK_FILE": str(peak)}, timeout=240, check=False)
    line = one_error_line(done)
    assert line == (f"error: --input-size {size}: one image would need about {gib} GiB of activations in tiny, "
                    "over the 4.0 GiB limit (raise it with --max-memory GIB, or max_activation_bytes= in Python, "
                    "if the machine has the memory)")
    # KiB. Importing the CUDA build of torch alone maps about 0.9 GiB here; the trace would add 4.5 GiB or more.
    assert int(peak.read_text()) < 2_500_000


def test_max_memory_moves_the_bound() -> None:
    small = ["--model", "zfnet_cifar", "--weights", "random", "--input-size", "3,512,512"]
    line = one_error_line(convscope("summary", *small, "--max-memory", "0.1"))
    assert "one image would need about 210 MiB of activations in zfnet_cifar, over the 102 MiB limit" in line
    done = convscope("summary", *small, "--max-memory", "0.5", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["input_size"] == [3, 512, 512]


@pytest.mark.parametrize("name", ["zfnet_cifar", "alexnet_cifar"])
def test_estimate_bounds_the_real_activation_memory(name: str) -> None:
    from convscope.methods.summary import estimated_activation_bytes, summary
    from convscope.models.load import load_model

    loaded = load_model(name, "random")
    for size in [(3, 32, 32), (3, 96, 64), (3, 256, 256)]:
        real = summary(loaded, input_size=size).activation_bytes + 3 * size[1] * size[2] * 4
        estimate = estimated_activation_bytes(loaded, size)
        assert real <= estimate <= 1.05 * real, (size, real, estimate)
