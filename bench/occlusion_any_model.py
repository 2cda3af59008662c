"""Occlusion on a plain torchvision model: convscope (exact) vs captum's ``Occlusion``, one run.

The model is ``torchvision.models.resnet50(weights=None)`` handed over as a bare ``nn.Module``
(not a registry row): random weights, with the BatchNorm running statistics re-estimated on
three photos (skimage's chelsea, astronaut, coffee; train-mode forward with ``momentum=None``,
then eval), so that the probabilities move when the square hides something. Both sides get the
same 224x224 chelsea tensor, window, stride, baseline (0 in input space) and target (the clean
top-1), and both compute softmax probabilities.

Calls alternate between the two sides so that both see the same machine load; each side is
warmed up once (convscope on the whole grid: oneDNN builds kernels for each new crop shape on
first use; captum on one batch of its shape), then ``--repeats`` timed runs, best kept. The
ratio is captum's wall-clock time / convscope's (target >= 2x); process CPU times are printed
too. The maps are compared (max per-pixel difference, and relative to the map's own scale). On a
shared machine ``--threads 1`` gives the steadiest ratios (two OpenMP threads competing with
other jobs swing by several times from call to call).

Usage::

    .venv/bin/python bench/occlusion_any_model.py                 # window 32, stride 16
    .venv/bin/python bench/occlusion_any_model.py --window 16 --stride 8 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}
TARGET = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--ppe", type=int, default=64, help="captum perturbations_per_eval (and our batch size)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side after the warm-up (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--keep-env", action="store_true", help="do not set the malloc variables (both sides)")
    args = parser.parse_args()

    if not args.keep_env and any(os.environ.get(k) != v for k, v in ENV.items()):
        os.environ.update(ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch
    import torchvision
    from captum.attr import Occlusion
    from skimage import data

    from convscope.methods.occlusion import occlusion

    if args.threads:
        torch.set_num_threads(args.threads)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tensor(photo: object) -> torch.Tensor:
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255  # type: ignore[call-overload]
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return (x - mean) / std

    photos = torch.cat([tensor(f()) for f in (data.chelsea, data.astronaut, data.coffee)])
    torch.manual_seed(0)
    module = torchvision.models.resnet50(weights=None)
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the photos
    module.train()
    with torch.no_grad():
        module(photos)
    module.eval()
    image = photos[:1].contiguous()
    window, stride = args.window, args.stride
    with torch.no_grad():
        module(image)
        start = time.perf_counter()
        for _ in range(3):
            target = int(module(image).argmax())
        forward = (time.perf_counter() - start) / 3

    def softmax_model(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(module(x), dim=1)

    def run_captum(size: int = window, step: int = stride) -> torch.Tensor:
        with torch.no_grad():
            return Occlusion(softmax_model).attribute(
                image, sliding_window_shapes=(3, size, size), strides=(3, step, step), baselines=0.0,
                target=target, perturbations_per_eval=args.ppe,
            )[0, 0]

    def run_ours() -> object:
        return occlusion(module, image, target, window=window, stride=stride, fill=0.0, batch_size=args.ppe,
                         cover_border=True)

    rows = len(range(0, 224 - window, stride)) + 1
    env = ", ".join(f"{k}={os.environ.get(k, '-')}" for k in ENV)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; env (both sides): {env}")
    print(f"torchvision resnet50, random weights, BatchNorm statistics re-estimated on 3 photos; 224x224 chelsea, "
          f"window {window}, stride {stride} ({rows}x{rows} positions), baseline 0, target {target}")
    run_captum()  # warm-up: a whole run (the first batches of a new shape are slow)
    run_ours()  # warm-up: a whole run (oneDNN builds a kernel per crop shape on first use)
    captum_times, ours_times, captum_cpu, ours_cpu = [], [], [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        theirs = run_captum()
        captum_times.append(time.perf_counter() - start)
        captum_cpu.append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        ours = run_ours()
        ours_times.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - cpu)
    captum_time, ours_time = min(captum_times), min(ours_times)
    pixel_drop = ours.pixel_drop[0]  # type: ignore[attr-defined]
    stats = ours.stats  # type: ignore[attr-defined]
    scale = float(theirs.abs().max())
    difference = float((pixel_drop - theirs).abs().max())
    print(f"   one forward pass (1 image): {forward * 1000:.1f} ms")
    print(f"   captum Occlusion (ppe {args.ppe}): {captum_time:7.2f} s  ({captum_time / forward:6.1f} forward passes); "
          f"runs: {', '.join(f'{t:.2f}' for t in captum_times)}")
    print(f"   convscope exact ({stats.mode}):  {ours_time:7.2f} s  ({ours_time / forward:6.1f} forward passes); "
          f"runs: {', '.join(f'{t:.2f}' for t in ours_times)}")
    last = stats.incremental_layers[-1] if stats.incremental_layers else "-"
    print(f"   incremental layers: {len(stats.incremental_layers)} (to {last}); multiply-adds per copy "
          f"{stats.work_fraction:.2f} of a full pass; note: {stats.note or '-'}")
    print(f"   max |per-pixel difference| vs captum: {difference:.2e} (map scale {scale:.2e}, "
          f"relative {difference / max(scale, 1e-30):.1e})")
    print(f"   process CPU time: captum {min(captum_cpu):.2f} s, convscope {min(ours_cpu):.2f} s "
          f"({min(captum_cpu) / min(ours_cpu):.2f}x)")
    ratio = captum_time / ours_time
    print(f"speed-up vs captum (wall clock): {ratio:.2f}x (target >= {TARGET:.0f}x) {'met' if ratio >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
