"""Occlusion: convscope (exact, incremental) vs captum's ``Occlusion``, measured in one run.

Settings of issue 3: 224x224 photo, window 16, stride 8 (27x27 = 729 positions), the same
target, softmax probabilities, fill 0 in input space.

captum runs at each ``perturbations_per_eval`` in ``--ppe``: a probe (one warm-up batch, then
``--probe-batches`` timed batches) ranks them, and the two fastest run the whole grid
``--repeats`` times each; captum's time is the best of those runs. convscope runs once
untimed (oneDNN builds its kernels for each new crop shape on first use; captum's probe warms
its one shape the same way), then ``--repeats`` timed runs, best kept. Costs are also given as
multiples of one forward pass of one image.

Environment: glibc's malloc returns big freed blocks to the kernel, so every large batch is
page-faulted afresh (the brief measured 2x on EfficientNet-Lite). Unless ``--keep-env`` is
given the bench re-runs itself with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
raised, for both sides alike; ``--passive`` also sets ``OMP_WAIT_POLICY=PASSIVE``, steadier
when other jobs share the two cores. The first line printed says which applied. With
``--keep-env`` each side runs as its users get it: ``convscope.occlusion`` tunes the allocator
around its call (``runtime.allocator_tuned``) and hands it back after, at or above glibc's own
adaptive thresholds, so captum's runs after ours are not slowed by it; captum is untuned.

Usage::

    .venv/bin/python bench/occlusion.py                    # alexnet, vgg16, efficientnet_lite0
    .venv/bin/python bench/occlusion.py --models alexnet --ppe 64,128
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py

ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 31),
}
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
TARGETS = {"alexnet": 3.0, "vgg16": 5.0, "efficientnet_lite0": 2.0}


class _Stop(Exception):
    pass


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="alexnet,vgg16,efficientnet_lite0")
    parser.add_argument("--ppe", default="16,32,64,128", help="captum perturbations_per_eval to try")
    parser.add_argument("--batch-size", type=int, default=None, help="convscope copies per pass (default: library's)")
    parser.add_argument("--probe-batches", type=int, default=2, help="timed captum batches per ppe in the probe")
    parser.add_argument("--repeats", type=int, default=2, help="timed whole runs per side (best kept)")
    parser.add_argument("--keep-env", action="store_true", help="do not set the malloc variables")
    parser.add_argument("--passive", action="store_true", help="also set OMP_WAIT_POLICY=PASSIVE")
    args = parser.parse_args()

    wanted = ({} if args.keep_env else dict(ENV)) | (PASSIVE if args.passive else {})
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.environ.update(wanted)
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch
    from captum.attr import Occlusion
    from PIL import Image
    from skimage import data

    from convscope import load_model
    from convscope.methods.occlusion import occlusion

    env = ", ".join(f"{k}={os.environ.get(k, '-')}" for k in (*ENV, *PASSIVE))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; env (both sides): {env}")
    print("224x224 chelsea, window 16, stride 8, fill 0 (input space), target = clean top-1\n")
    summary = []
    for name in args.models.split(","):
        loaded = load_model(name, weights="pretrained" if name.startswith("efficientnet") else "random", seed=0)
        module = loaded.module
        image = loaded.preprocess.to_tensor(Image.fromarray(data.chelsea()))
        with torch.no_grad():
            module(image)
            start = time.perf_counter()
            for _ in range(3):
                target = int(module(image).argmax())
            forward = (time.perf_counter() - start) / 3

        def softmax_model(x: torch.Tensor, module: torch.nn.Module = module) -> torch.Tensor:
            return torch.softmax(module(x), dim=1)

        # captum probe: time per perturbation at each ppe, skipping one warm-up batch.
        probe = {}
        for ppe in [int(p) for p in args.ppe.split(",")]:
            calls = {"n": 0, "start": 0.0}

            def counted(x: torch.Tensor, ppe: int = ppe, calls: dict = calls) -> torch.Tensor:
                if x.shape[0] == ppe:
                    calls["n"] += 1
                    if calls["n"] == 2:
                        calls["start"] = time.perf_counter()
                    elif calls["n"] == 2 + args.probe_batches:
                        calls["stop"] = time.perf_counter()
                        raise _Stop
                return softmax_model(x)

            try:
                with torch.no_grad():
                    Occlusion(counted).attribute(
                        image, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.0,
                        target=target, perturbations_per_eval=ppe,
                    )
            except _Stop:
                probe[ppe] = (calls["stop"] - calls["start"]) / (ppe * args.probe_batches)
        ranked = sorted(probe, key=probe.get)[:2]

        def run_captum(ppe: int, image: torch.Tensor = image, target: int = target) -> torch.Tensor:
            with torch.no_grad():
                return Occlusion(softmax_model).attribute(
                    image, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.0,
                    target=target, perturbations_per_eval=ppe,
                )

        captum_runs = []  # (seconds, ppe, page faults)
        for ppe in ranked:
            for _ in range(args.repeats):
                faults = _faults()
                start = time.perf_counter()
                theirs = run_captum(ppe)
                captum_runs.append((time.perf_counter() - start, ppe, _faults() - faults))
        captum_time, best, captum_faults = min(captum_runs)

        kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
        occlusion(loaded, image, target, window=16, stride=8, fill=0.0, **kwargs)  # warm-up
        ours_runs = []
        for _ in range(args.repeats):
            faults = _faults()
            start = time.perf_counter()
            ours = occlusion(loaded, image, target, window=16, stride=8, fill=0.0, **kwargs)
            ours_runs.append((time.perf_counter() - start, _faults() - faults))
        ours_time, ours_faults = min(ours_runs)
        start = time.perf_counter()
        occlusion(loaded, image, target, window=16, stride=8, fill=0.0, mode="full", **kwargs)
        full_time = time.perf_counter() - start
        occlusion(loaded, image, target, window=16, stride=8, fill=0.0, mode="approximate", **kwargs)  # warm-up
        approx_runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            approx = occlusion(loaded, image, target, window=16, stride=8, fill=0.0, mode="approximate", **kwargs)
            approx_runs.append(time.perf_counter() - start)
        approx_time = min(approx_runs)
        approx_error = float((approx.probability - ours.probability).abs().max())

        difference = float((theirs[0, 0] - ours.pixel_drop[0]).abs().max())
        ratio = captum_time / ours_time
        print(f"== {name}: one forward pass (1 image) {forward * 1000:.1f} ms; target {target}")
        print("   captum probe, ms per perturbation: " + ", ".join(f"ppe {p}: {t * 1000:.1f}" for p, t in probe.items()))
        print("   captum whole runs: " + ", ".join(f"ppe {p}: {t:.2f} s" for t, p, _ in captum_runs))
        print(f"   captum Occlusion (ppe {best}):   {captum_time:7.2f} s   ({captum_time / forward:6.1f} forward passes, {captum_faults} page faults)")
        print("   convscope exact runs: " + ", ".join(f"{t:.2f} s" for t, _ in ours_runs))
        print(f"   convscope exact (incremental):  {ours_time:7.2f} s   ({ours_time / forward:6.1f} forward passes, {ours_faults} page faults)")
        print(f"   convscope mode='full' (batched): {full_time:7.2f} s")
        print(f"   incremental layers: {len(ours.stats.incremental_layers)} (to {ours.stats.incremental_layers[-1] if ours.stats.incremental_layers else '-'}); "
              f"multiply-adds per copy: {ours.stats.work_fraction:.2f} of a full pass")
        print(f"   max |per-pixel difference| vs captum: {difference:.2e}")
        print(f"   convscope mode='approximate' ({approx.stats.precision}): {approx_time:.2f} s, "
              f"{captum_time / approx_time:.2f}x captum; max |probability - exact| {approx_error:.2e}")
        print(f"   speed-up vs captum: {ratio:.2f}x (target >= {TARGETS.get(name, 1.0):.0f}x)\n")
        summary.append((name, ratio, TARGETS.get(name, 1.0)))
        row(f"occlusion {name}", f"captum Occlusion (ppe {best})", ratio, TARGETS.get(name, 1.0),
            detail=f"window 16 stride 8, max diff {difference:.1e}; " + (
                "peer's allocator untuned, as its users run it (ours tunes around its call)" if args.keep_env
                else "both sides under the same MALLOC_* settings"))
    for name, ratio, goal in summary:
        print(f"{name:20s} {ratio:5.2f}x  target {goal:.0f}x  {'met' if ratio >= goal else 'NOT met'}")


if __name__ == "__main__":
    main()
