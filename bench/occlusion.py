"""Occlusion: convscope (exact, incremental) vs captum's ``Occlusion``, measured in one run.

Settings of issue 3: 224x224 photo, window 16, stride 8 (27x27 = 729 positions), the same
target, softmax probabilities, fill 0 in input space. captum runs at each
``perturbations_per_eval`` in ``--ppe``; a short probe (one warm-up batch, then timed
batches) picks the fastest, which then runs the whole grid. convscope's cost is also given as
a multiple of one forward pass of one image.

Threads: both sides share the same torch thread pool. On a shared 2-core machine OpenMP's
spinning wait turns every parallel region into a fight with other processes, so unless
``--keep-env`` is given the bench re-runs itself with ``OMP_WAIT_POLICY=PASSIVE`` (and the
glibc malloc thresholds raised so large buffers are reused instead of being mapped and
page-faulted afresh); this applies to both sides equally and the output says so.

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

ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 31),
}
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
    parser.add_argument("--probe-batches", type=int, default=1, help="timed captum batches per ppe in the probe")
    parser.add_argument("--keep-env", action="store_true", help="do not set OMP/malloc variables")
    args = parser.parse_args()

    if not args.keep_env and any(os.environ.get(k) != v for k, v in ENV.items()):
        os.environ.update(ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch
    from captum.attr import Occlusion
    from PIL import Image
    from skimage import data

    from convscope import load_model
    from convscope.methods.occlusion import occlusion

    env = ", ".join(f"{k}={os.environ.get(k, '-')}" for k in ENV)
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

        def softmax_model(x: torch.Tensor) -> torch.Tensor:
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
        best = min(probe, key=probe.get)

        faults = _faults()
        start = time.perf_counter()
        with torch.no_grad():
            theirs = Occlusion(softmax_model).attribute(
                image, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.0,
                target=target, perturbations_per_eval=best,
            )
        captum_time = time.perf_counter() - start
        captum_faults = _faults() - faults

        kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
        faults = _faults()
        start = time.perf_counter()
        ours = occlusion(loaded, image, target, window=16, stride=8, fill=0.0, **kwargs)
        ours_time = time.perf_counter() - start
        ours_faults = _faults() - faults
        start = time.perf_counter()
        occlusion(loaded, image, target, window=16, stride=8, fill=0.0, mode="full", **kwargs)
        full_time = time.perf_counter() - start

        difference = float((theirs[0, 0] - ours.pixel_drop[0]).abs().max())
        ratio = captum_time / ours_time
        print(f"== {name}: one forward pass (1 image) {forward * 1000:.1f} ms; target {target}")
        print("   captum probe, ms per perturbation: " + ", ".join(f"ppe {p}: {t * 1000:.1f}" for p, t in probe.items()))
        print(f"   captum Occlusion (ppe {best}):   {captum_time:7.2f} s   ({captum_time / forward:6.1f} forward passes, {captum_faults} page faults)")
        print(f"   convscope exact (incremental):  {ours_time:7.2f} s   ({ours_time / forward:6.1f} forward passes, {ours_faults} page faults)")
        print(f"   convscope mode='full' (batched): {full_time:7.2f} s")
        print(f"   incremental layers: {len(ours.stats.incremental_layers)} (to {ours.stats.incremental_layers[-1] if ours.stats.incremental_layers else '-'}); "
              f"multiply-adds per copy: {ours.stats.work_fraction:.2f} of a full pass")
        print(f"   max |per-pixel difference| vs captum: {difference:.2e}")
        print(f"   speed-up vs captum: {ratio:.2f}x (target >= {TARGETS.get(name, 1.0):.0f}x)\n")
        summary.append((name, ratio, TARGETS.get(name, 1.0)))
    for name, ratio, goal in summary:
        print(f"{name:20s} {ratio:5.2f}x  target {goal:.0f}x  {'met' if ratio >= goal else 'NOT met'}")


if __name__ == "__main__":
    main()
