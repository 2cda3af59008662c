"""The CPU fast path (issue 13): allocator tuning, channels-last rows, bf16 precision."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import skimage_photo
from torch import nn
from typer.testing import CliRunner

import convscope
from convscope import runtime
from convscope.cli.main import app
from convscope.errors import BadArgument
from convscope.models.load import load_model
from convscope.models.registry import get_spec, list_models

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
EXPECTED = {"M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 1 << 28}


def _python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(os.environ), check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="allocator tuning needs glibc")
def test_library_never_tunes_on_its_own_and_tune_cpu_is_idempotent() -> None:
    result = _python("""
        import json, torch, convscope
        from convscope import runtime
        loaded = convscope.load_model("tiny", weights="random")
        convscope.classify(loaded, torch.zeros(2, 3, 32, 32))
        before = runtime.tuned_settings()
        first, second = convscope.tune_cpu(), convscope.tune_cpu()
        print(json.dumps({"before": before, "first": first.__dict__, "second": second.__dict__,
                          "tuned": [first.tuned, second.tuned]}))
    """)
    assert result["before"] == {}  # importing, loading and classifying left malloc alone
    first, second = result["first"], result["second"]
    assert first["changed"] == EXPECTED and first["active"] == EXPECTED and first["failed"] == []
    assert first["libc"].startswith("glibc ")
    assert first["note"] == ("allocator tuned: M_MMAP_THRESHOLD=1073741824, M_TRIM_THRESHOLD=2147483647, "
                             "M_TOP_PAD=268435456")
    assert second["changed"] == {} and second["active"] == EXPECTED and second["note"] == "already tuned"
    assert result["tuned"] == [True, True]


class _FakeLibc:
    """Records mallopt calls; refuses the parameters in ``refuse``."""

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 0 if parameter in self.refuse else 1

    def malloc_trim(self, pad: int) -> int:  # recorded if ever called: it must not be (see allocator_tuned)
        self.calls.append(("trim", pad))  # type: ignore[arg-type]
        return 1


TUNED_CALLS = [(-3, 1 << 30), (-1, 2**31 - 1), (-2, 1 << 28)]
AFTER_CALLS = [(-3, 32 << 20), (-1, 2**31 - 1), (-2, 128 << 10)]


def test_allocator_tuned_around_a_call_and_handed_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: (fake, "glibc 9.99"))
    monkeypatch.setattr(runtime, "_applied", {})
    with runtime.allocator_tuned() as tuned:
        assert tuned and fake.calls == TUNED_CALLS
        with runtime.allocator_tuned():  # nested: nothing set again, nothing handed back yet
            pass
        assert fake.calls == TUNED_CALLS
    assert fake.calls == TUNED_CALLS + AFTER_CALLS  # glibc's own thresholds again, no trim
    assert runtime.tuned_settings() == {}  # still an untuned process as far as tune_cpu is concerned


@pytest.mark.parametrize("variable", [("MALLOC_MMAP_THRESHOLD_", "1073741824"),
                                      ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=2147483647")])
def test_allocator_tuned_leaves_the_environments_settings_alone(variable: tuple[str, str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: (fake, "glibc 9.99"))
    monkeypatch.setattr(runtime, "_applied", {})
    monkeypatch.setenv(*variable)
    with runtime.allocator_tuned():
        pass
    assert fake.calls == []  # the user's MALLOC_* or tunables stay in force, during and after


def test_allocator_tuned_leaves_a_tuned_process_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: (fake, "glibc 9.99"))
    monkeypatch.setattr(runtime, "_applied", {})
    runtime.tune_cpu()
    fake.calls.clear()
    with runtime.allocator_tuned() as tuned:
        assert tuned
    assert fake.calls == []  # the CLI's (or the user's) tuning is never undone


@pytest.mark.parametrize("method", ["scorecam", "occlusion", "integrated_gradients", "smoothgrad", "lrp"])
def test_batch_heavy_methods_run_with_the_allocator_tuned(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: (fake, "glibc 9.99"))
    monkeypatch.setattr(runtime, "_applied", {})
    loaded = load_model("tiny", weights="random")
    options = {"occlusion": {"window": 8, "stride": 8}, "smoothgrad": {"samples": 2}}.get(method, {})
    getattr(convscope, method)(loaded, torch.rand(1, 3, 32, 32), **options)
    assert fake.calls == TUNED_CALLS + AFTER_CALLS  # tuned once for the call, handed back once


def test_mallopt_parameters_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: (fake, "glibc 9.99"))
    monkeypatch.setattr(runtime, "_applied", {})
    report = runtime.tune_cpu()
    # glibc <malloc.h>: M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3
    assert sorted(fake.calls) == [(-3, 1 << 30), (-2, 1 << 28), (-1, 2**31 - 1)]
    assert report.changed == EXPECTED and report.libc == "glibc 9.99"
    assert runtime.tune_cpu().changed == {} and len(fake.calls) == 3  # nothing set twice


def test_refused_setting_is_reported_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc(refuse=(-2,))
    monkeypatch.setattr(runtime, "_glibc", lambda: (fake, "glibc 9.99"))
    monkeypatch.setattr(runtime, "_applied", {})
    report = runtime.tune_cpu()
    assert report.failed == ("M_TOP_PAD",) and "M_TOP_PAD" not in report.changed
    assert report.note == "allocator partly tuned: glibc refused M_TOP_PAD"
    fake.refuse = ()
    assert runtime.tune_cpu().changed == {"M_TOP_PAD": 1 << 28}


def test_not_glibc_is_a_no_op_that_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_glibc", lambda: (None, "musl 1.2.4"))
    monkeypatch.setattr(runtime, "_applied", {})
    report = runtime.tune_cpu()
    assert (report.changed, report.active, report.tuned) == ({}, {}, False)
    assert report.note == "allocator not tuned: musl 1.2.4 is not glibc"


def test_float32_results_identical_tuned_and_untuned() -> None:
    # Same process: untuned first, then tuned; batch 16 of real photos on the default model
    # (tens of MB per activation, the sizes the allocator settings change).
    result = _python(f"""
        import json, torch, convscope
        from PIL import Image
        loaded = convscope.load_model()
        photos = [Image.open(p).convert("RGB") for p in {[str(skimage_photo(n)) for n in ("chelsea.png", "coffee.png")]!r}]
        x = loaded.preprocess.to_tensor(photos * 8)
        with torch.inference_mode():
            untuned = loaded.module(x)
            report = convscope.tune_cpu()
            tuned = [loaded.module(x) for _ in range(2)]
        print(json.dumps({{"tuned": report.tuned, "same": [bool(torch.equal(untuned, t)) for t in tuned],
                          "top": untuned.argmax(1)[:2].tolist()}}))
    """)
    assert result["tuned"] == GLIBC
    assert result["same"] == [True, True]
    assert result["top"] == [285, 967]  # Egyptian cat, espresso: the comparison is on a working model


def test_cli_tunes_at_startup_unless_no_tune() -> None:
    env = dict(os.environ, CONVSCOPE_DEBUG="1")
    env.pop("CONVSCOPE_NO_TUNE", None)
    command = [sys.executable, "-m", "convscope"]
    tuned = subprocess.run([*command, "models"], check=False, capture_output=True, text=True, env=env)
    untuned = subprocess.run([*command, "--no-tune", "models"], check=False, capture_output=True, text=True, env=env)
    assert tuned.returncode == untuned.returncode == 0
    expected = "allocator tuned: M_MMAP_THRESHOLD=1073741824" if GLIBC else "allocator not tuned"
    assert expected in tuned.stderr
    assert "allocator" not in untuned.stderr
    assert untuned.stdout == tuned.stdout


@pytest.mark.parametrize("name", list_models())
def test_registry_layout_is_applied_by_load_model(name: str) -> None:
    spec = get_spec(name)
    module = load_model(name, weights="random").module
    # a 1x1 kernel, or a kernel over one input channel (the grey nets' first layer), is both layouts at once
    convs = [m for m in module.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.in_channels // m.groups > 1]
    assert convs
    layout = torch.channels_last if spec.channels_last else torch.contiguous_format
    assert all(m.weight.is_contiguous(memory_format=layout) for m in convs)
    if spec.channels_last:
        assert not convs[0].weight.is_contiguous()


def test_channels_last_rows_are_the_measured_ones() -> None:
    # bench/cpu_fast_path.py layouts, 2026-12-08 (torch 2.14, 2 cores): every registered model ran
    # faster channels-last, 1.26x (alexnet, vgg16) to 2.63x (tiny); the registry rows cite each ratio.
    measured = {name for name in list_models() if get_spec(name).channels_last}
    assert measured == CHANNELS_LAST_MEASURED


CHANNELS_LAST_MEASURED = {"alexnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
                          "resnet50", "vgg16", "zfnet", "tiny", "alexnet_mnist", "alexnet_cifar", "zfnet_mnist",
                          "zfnet_cifar"}


def test_precision_names() -> None:
    assert runtime.resolve_precision("float32").used == "float32"
    assert runtime.resolve_precision("FP32").requested == "float32"
    assert runtime.resolve_precision("bfloat16").requested == "bf16"
    with pytest.raises(BadArgument, match=r"^--precision fp64: is not a precision \(choose from: float32, bf16\)$"):
        runtime.resolve_precision("fp64")


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_bf16_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert runtime.native_bf16("cpu") == (True, "CPU with amx_bf16")
    model, x = _conv(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        with runtime.inference_precision("bf16") as choice:
            got = model(x)
        after = model(x)
    assert (choice.used, choice.note) == ("bf16", "")
    assert got.dtype == torch.bfloat16 and after.dtype == torch.float32  # autocast ends with the block
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)
    assert model[0].weight.dtype == torch.float32


def test_bf16_falls_back_to_float32_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f"})
    model, x = _conv(), torch.randn(2, 3, 8, 8)
    with torch.no_grad(), runtime.inference_precision("bf16") as choice:
        got = model(x)
    assert choice.used == "float32" and got.dtype == torch.float32
    assert choice.note.startswith("--precision bf16: this CPU has no AMX or AVX-512-BF16")
    assert choice.note.endswith("; running float32")
    assert torch.equal(got, model(x))


def test_cli_classify_precision(tmp_path) -> None:
    runner = CliRunner()
    photo = str(skimage_photo("chelsea.png"))
    bf16 = runner.invoke(app, ["--no-tune", "classify", photo, "--json", "--precision", "bf16"])
    plain = runner.invoke(app, ["--no-tune", "classify", photo, "--json"])
    assert bf16.exit_code == plain.exit_code == 0, bf16.output
    first, second = json.loads(plain.stdout)[0]["predictions"], json.loads(bf16.stdout)[0]["predictions"]
    assert first[0]["index"] == second[0]["index"] == 285
    assert abs(first[0]["probability"] - second[0]["probability"]) < 0.05
    native, _ = runtime.native_bf16("cpu")
    assert ("note: --precision bf16" in bf16.stderr) == (not native)
    bad = runner.invoke(app, ["--no-tune", "classify", photo, "--precision", "half"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: --precision half: is not a precision (choose from: float32, bf16)"
    assert not torch.is_autocast_enabled("cpu")  # the command's autocast ended with it


def test_tune_cpu_is_exported() -> None:
    assert convscope.tune_cpu is runtime.tune_cpu and "tune_cpu" in convscope.__all__
