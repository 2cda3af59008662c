"""Every bad argument is one line and exit code 2 (issue 8, item 5), checked through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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
    from convscope.cli.main import main
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


# ---------------------------------------------------------------- the analysis commands (issue 21)

BUNDLED = Path(__file__).resolve().parents[1] / "convscope" / "data" / "chelsea.jpg"

# The child times the command itself (torch is imported before the clock starts) and reports its peak
# memory. The data ceiling makes the code as it was, which grew a list or a buffer until the allocator
# failed, end in a MemoryError within seconds instead of taking the machine's memory.
BOUNDED = textwrap.dedent("""
    import os, resource, sys, time
    import torch  # noqa: F401
    from convscope.cli.main import main
    resource.setrlimit(resource.RLIMIT_DATA, (2 * 2**30, 2 * 2**30))
    sys.argv = ["convscope", *sys.argv[2:]]
    start = time.perf_counter()
    try:
        main()
    finally:
        seconds = time.perf_counter() - start
        with open("/proc/self/status") as status:
            peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        with open(os.environ["PEAK_FILE"], "w") as f:
            f.write(f"{peak} {seconds}")
""")


def bounded(tmp_path: Path, *args: object) -> tuple[str, int, float]:
    """The one error line, the peak memory (KiB) and the command's own wall time (s)."""
    peak = tmp_path / "peak"
    done = subprocess.run([sys.executable, "-c", BOUNDED, "-", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, "PEAK_FILE": str(peak)}, timeout=90, check=False)
    line = one_error_line(done)
    kib, seconds = peak.read_text().split()
    return line, int(kib), float(seconds)


TOO_MANY = "over the limit of 1000 (use a larger step or a shorter range)"


@pytest.mark.parametrize(("amounts", "reason"), [
    ("0:1e12:1e-3", "1e12: must be between -1e+06 and 1e+06"),  # the example: the stop is out of bounds
    ("0:1e6:1e-3", f"0:1e6:1e-3: gives 1000000001 amounts, {TOO_MANY}"),
    ("0:100000:1", f"0:100000:1: gives 100001 amounts, {TOO_MANY}"),
    ("-1e6:1e6:1e-300", f"-1e6:1e6:1e-300: gives more than 1000 amounts, {TOO_MANY}"),
    (",".join(["1"] * 1001), f"{'1,' * 19}1…: gives 1001 amounts, {TOO_MANY}"),
])
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory read from /proc")
def test_invariance_refuses_too_many_amounts_before_allocating(amounts: str, reason: str, tmp_path: Path) -> None:
    # Issue 21, finding 5: the range grew until the allocator failed (or ran 100001 passes per image).
    line, kib, seconds = bounded(tmp_path, "invariance", BUNDLED, f"--amounts={amounts}", "-o", tmp_path / "out",
                                 *TINY)
    assert line == f"error: --amounts {reason}"
    assert kib < 2_000_000 and seconds < 2.0, (kib, seconds)
    assert not (tmp_path / "out").exists()
    help_text = " ".join(run_cli("invariance", "--help").output.replace("│", " ").split())
    assert "at most 1000 amounts, each between -1e+06 and 1e+06" in help_text


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_correspondence_refuses_a_device_as_parts_file(tmp_path: Path) -> None:
    # Issue 21, finding 5: --parts /dev/zero read until memory ran out.
    line, kib, seconds = bounded(tmp_path, "correspondence", BUNDLED, BUNDLED, "--parts", "/dev/zero",
                                 "-o", tmp_path / "out", *TINY)
    assert line == "error: --parts /dev/zero: is not a regular file (a device, pipe or socket)"
    assert kib < 2_000_000 and seconds < 2.0, (kib, seconds)
    assert not (tmp_path / "out").exists()


def run_cli(*args: object) -> Any:
    from typer.testing import CliRunner

    from convscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result: Any) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output
    return str(lines[0])


def test_correspondence_refuses_a_parts_file_over_the_size_limit(tmp_path: Path) -> None:
    # Issue 21, finding 5: files are read with a limit, stated in the option's help.
    parts = tmp_path / "parts.json"
    with parts.open("wb") as f:
        f.truncate(4 * 2**20 + 1)  # sparse: 4 MiB and one byte of zeros
    line = one_line(run_cli("correspondence", BUNDLED, BUNDLED, "--parts", parts, "-o", tmp_path / "out", *TINY))
    assert line == f"error: --parts {parts}: is 4.0 MiB, over the 4 MiB limit of a parts file"
    assert "of at most 4 MiB" in " ".join(run_cli("correspondence", "--help").output.replace("│", " ").split())


@pytest.mark.parametrize("command", ["invariance", "quality"])
@pytest.mark.parametrize(("target", "reason"), [
    ("²", "is not a class index: use the digits 0-9 only, no sign (0 is the first class)"),
    ("--5", "is not a class index: use the digits 0-9 only, no sign (0 is the first class)"),
    ("-5", "is not a class index: use the digits 0-9 only, no sign (0 is the first class)"),
    ("١٢", "is not a class index: use the digits 0-9 only, no sign (0 is the first class)"),
    ("7" * 5000, "is out of range: a class index has at most 18 digits"),
])
def test_analysis_target_takes_ascii_class_indices_only(command: str, target: str, reason: str, tmp_path: Path) -> None:
    # Issue 21, finding 8: --target ² (and a 5000-digit target) ended in a traceback.
    line = one_line(run_cli(command, BUNDLED, "--target", target, "-o", tmp_path / "out", *TINY))
    shown = target if len(target) < 40 else target[:39] + "…"
    assert line == f"error: --target {shown}: {reason}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("amounts", "expected"), [
    ("1e308", "error: --amounts 1e308: must be between -1e+06 and 1e+06"),
    ("0:inf:1", "error: --amounts inf: must be a finite number"),
    ("nan", "error: --amounts nan: must be a finite number"),
    ("0,1e999", "error: --amounts 1e999: must be a finite number"),
])
def test_invariance_refuses_non_finite_amounts(amounts: str, expected: str, tmp_path: Path) -> None:
    # Issue 21, finding 9.
    line = one_line(run_cli("invariance", BUNDLED, f"--amounts={amounts}", "-o", tmp_path / "out", *TINY))
    assert line == expected
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("box", "value"), [("[NaN, 0, 40, 40]", "NaN"), ("[0, Infinity, 40, 40]", "Infinity"),
                                            ("[0, 0, -Infinity, 40]", "-Infinity"), ("[0, 0, 1e999, 40]", "1e999")])
def test_correspondence_refuses_non_finite_boxes(box: str, value: str, tmp_path: Path) -> None:
    # Issue 21, finding 9: a NaN or Infinity box in parts.json ended in a traceback.
    parts = tmp_path / "parts.json"
    parts.write_text('{"eye": ' + box + "}")
    line = one_line(run_cli("correspondence", BUNDLED, BUNDLED, "--parts", parts, "-o", tmp_path / "out", *TINY))
    assert line == f"error: --parts {parts}: box coordinates must be finite numbers, not {value}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fill", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_quality_fill_must_be_finite(fill: str, tmp_path: Path) -> None:
    # Issue 21, finding 13: --fill nan was accepted and reported nan ± nan.
    line = one_line(run_cli("quality", BUNDLED, "--fill", fill, "--methods", "saliency", "-o", tmp_path / "out", *TINY))
    assert line == f"error: --fill {fill}: must be a finite number"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value", "known"), [
    ("--methods", ",", "gradcam, gradcampp, guided-gradcam, guided, saliency, deconv, occlusion, scorecam, lrp, ig, smoothgrad"),
    ("--methods", " , ,", "gradcam, gradcampp, guided-gradcam, guided, saliency, deconv, occlusion, scorecam, lrp, ig, smoothgrad"),
    ("--metrics", ",", "deletion, insertion, randomization"),
])
def test_quality_refuses_an_empty_list(option: str, value: str, known: str, tmp_path: Path) -> None:
    # Issue 21, finding 13: --methods , ran nothing and exited 0.
    line = one_line(run_cli("quality", BUNDLED, option, value, "-o", tmp_path / "out", *TINY))
    assert line == f"error: {option} {value.strip()}: names nothing (choose from {known})"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "expected"), [
    ("١٢", "error: --class ١٢: is not a class index: use the digits 0-9 only, no sign (0 is the first class)"),
    ("²", "error: --class ²: is not a class index: use the digits 0-9 only, no sign (0 is the first class)"),
    ("9" * 5000, "error: --class " + "9" * 39 + "…: is out of range: a class index has at most 18 digits"),
    ("cat", "error: --class cat: is not a class index (0, 1, ...) (give a class name with --label)"),
    ("1_0", "error: --class 1_0: is not a class index (0, 1, ...) (give a class name with --label)"),
])
def test_class_option_takes_ascii_class_indices_only(value: str, expected: str, tmp_path: Path) -> None:
    # Issue 21, finding 8: --class went through typer's own integer check (its wording, not the one parser's),
    # which read 1_0 as 10.
    line = one_line(run_cli("gradcam", BUNDLED, "--class", value, "-o", tmp_path / "out", *TINY))
    assert line.replace(" (see 'gradcam --help')", "") == expected
    assert not (tmp_path / "out").exists()
