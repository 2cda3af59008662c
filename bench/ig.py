"""Integrated Gradients vs captum ``IntegratedGradients``, same models, same photo, same run.

Both integrate 50 Gauss-Legendre steps from the zero baseline for the photo's top class. captum
runs with ``internal_batch_size`` at each of ``--peer-batches`` (10, 25, 50 by default) and the
fastest of them is the peer; ours picks its chunk from the network's activation memory. Calls
alternate (ours, then each peer setting) so all see the same machine load; each time is the best
of ``--repeats`` calls after a warm-up, on the wall clock and in process CPU time. The ratio is
peer / ours ("x faster", target >= 1.5); the equality column is the largest difference divided
by the largest |attribution| (ours against the fastest peer setting).

``--fresh`` runs each side in its own process instead, one warm-up and one timed call per
process: ours as its users get it (the allocator tuned around the call), captum untuned as its
users get it, and captum with our allocator settings (``tune_cpu`` first); ``make bench`` uses it.

``--sweep 4,8,16,32`` also times ours at those fixed chunk sizes (points per forward/backward
pass), to show where the chunk choice stands. On a shared machine ``--threads 1`` gives the
steadiest ratios.

    .venv/bin/python bench/ig.py [--models efficientnet_lite0,resnet50] [--steps 50] [--batch 1]
        [--repeats 3] [--threads 1] [--tune] [--fresh] [--peer-batches 10,25,50] [--sweep 4,8,16,32]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py
from PIL import Image

from convscope.methods import paths
from convscope.methods.paths import integrated_gradients
from convscope.models.load import load_model


def photos(count: int) -> list[Image.Image]:
    import skimage

    names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]
    return [Image.open(Path(skimage.data_dir) / names[i % len(names)]).convert("RGB") for i in range(count)]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-``repeats`` (wall, cpu) seconds per call, the calls taking turns after a warm-up."""
    for fn in calls.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(timed(fn))
    return {name: (min(t[0] for t in runs), min(t[1] for t in runs)) for name, runs in times.items()}


def with_chunk(size: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        chosen = paths._chunk_size
        paths._chunk_size = lambda *_: size  # type: ignore[assignment]
        try:
            return fn()
        finally:
            paths._chunk_size = chosen  # type: ignore[assignment]

    return run


Call = Callable[[], torch.Tensor]


def sides(name: str, args: argparse.Namespace) -> tuple[Any, torch.Tensor, Call, Callable[[int], Call]]:
    """The model's photos and top classes, then ours and captum at ``internal_batch_size`` per image."""
    from captum.attr import IntegratedGradients

    weights = "pretrained" if name.startswith("efficientnet") else "random"
    loaded = load_model(name, weights, seed=0, device="cpu")
    module = loaded.module.eval()
    x = loaded.preprocess.to_tensor(photos(args.batch))
    with torch.no_grad():
        targets = module(x).argmax(dim=1)
    peer = IntegratedGradients(module)

    def ours() -> torch.Tensor:
        return integrated_gradients(loaded, x, target=targets, steps=args.steps).attributions

    def captum(batch: int) -> Callable[[], torch.Tensor]:
        return lambda: peer.attribute(x, baselines=0.0, target=targets, n_steps=args.steps,
                                      method="gausslegendre", internal_batch_size=batch * args.batch)

    return loaded, x, ours, captum


def bench_model(name: str, args: argparse.Namespace) -> None:
    loaded, x, ours, captum = sides(name, args)

    calls: dict[str, Callable[[], Any]] = {"ours": ours}
    calls |= {f"captum ibs={b}": captum(b) for b in args.peer_batches}
    calls |= {f"ours chunk={c}": with_chunk(c, ours) for c in args.sweep}
    times = interleaved(calls, args.repeats)
    peers = {k: v for k, v in times.items() if k.startswith("captum")}
    best = min(peers, key=lambda k: peers[k][0])
    mine = ours()
    theirs = captum(int(best.split("=")[1]))()
    equality = float((mine - theirs).abs().max() / theirs.abs().max())
    chunk = paths._chunk_size(loaded, x)
    print(f"\n{name}: {args.steps} steps, batch {args.batch}, our chunk at most {chunk} points, split evenly")
    for label, (wall, cpu) in times.items():
        print(f"  {label:<20}{wall * 1e3:>10.0f} ms wall{cpu * 1e3:>10.0f} ms cpu")
    ratio, cpu_ratio = times[best][0] / times["ours"][0], times[best][1] / times["ours"][1]
    print(f"  best peer: {best}; ours is {ratio:.2f}x faster (wall), {cpu_ratio:.2f}x (cpu); "
          f"max |ours - captum| / max |captum| = {equality:.1e}")
    row(f"integrated gradients {name}", f"captum IntegratedGradients ({best})", ratio, 1.5,
        detail=f"{args.steps} steps, batch {args.batch}, wall; equality {equality:.1e}; " + (
            "both sides tuned (tune_cpu)" if args.tune else "peer untuned, ours tunes around its call"))


def worker(args: argparse.Namespace) -> None:
    """One side of ``--fresh`` in this (fresh) process: load, one warm-up call, one timed call."""
    side, name = args.worker, args.models
    if side.startswith("captum-tuned:"):
        from convscope.runtime import tune_cpu

        tune_cpu()
    _, _, ours, captum = sides(name, args)
    call = ours if side == "ours" else captum(int(side.split(":")[1]))
    call()
    wall, cpu = timed(call)
    torch.save({"wall": wall, "cpu": cpu, "attributions": call()}, args.out)


def fresh(name: str, args: argparse.Namespace) -> None:
    """Each side in its own process, as its users run it (ours tunes the allocator around its call,
    captum does not), and captum under our allocator settings too; sides alternate."""
    import subprocess
    import sys
    import tempfile

    sides = ["ours"] + [f"{kind}:{b}" for kind in ("captum", "captum-tuned") for b in args.peer_batches]
    best: dict[str, tuple[float, float]] = {}
    found: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for side in sides:
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "side.pt"
                subprocess.run([sys.executable, __file__, "--worker", side, "--models", name, "--steps", str(args.steps),
                                "--batch", str(args.batch), "--threads", str(args.threads), "--out", str(out)],
                               check=True)
                result = torch.load(out)
            old = best.get(side, (float("inf"), float("inf")))
            best[side] = (min(old[0], result["wall"]), min(old[1], result["cpu"]))
            found[side] = result["attributions"]
            print(f"  {name} {side:<18}{result['wall'] * 1e3:>9.0f} ms wall{result['cpu'] * 1e3:>9.0f} ms cpu", flush=True)
    peer = min((s for s in sides if s.startswith("captum:")), key=lambda s: best[s][0])
    tuned = min((s for s in sides if s.startswith("captum-tuned:")), key=lambda s: best[s][0])
    equality = float((found["ours"] - found[peer]).abs().max() / found[peer].abs().max())
    ratio, tuned_ratio = best[peer][0] / best["ours"][0], best[tuned][0] / best["ours"][0]
    print(f"{name}: ours {best['ours'][0]:.2f} s; captum ({peer}) {best[peer][0]:.2f} s = {ratio:.2f}x; "
          f"captum with our allocator settings ({tuned}) {best[tuned][0]:.2f} s = {tuned_ratio:.2f}x; "
          f"equality {equality:.1e}", flush=True)
    row(f"integrated gradients {name}", f"captum IntegratedGradients (ibs={peer.split(':')[1]})", ratio, 1.5,
        detail=f"{args.steps} steps, batch {args.batch}, wall, each side in a fresh process; x{tuned_ratio:.2f} "
               f"against captum with our allocator settings; equality {equality:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--tune", action="store_true", help="convscope.tune_cpu() first (ours and the peer)")
    parser.add_argument("--peer-batches", default="10,25,50", help="captum internal_batch_size values (per image)")
    parser.add_argument("--sweep", default="", help="also time ours at these fixed chunk sizes")
    parser.add_argument("--fresh", action="store_true", help="each side in its own process (see fresh())")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        worker(args)
        return
    args.peer_batches = [int(v) for v in args.peer_batches.split(",") if v]
    args.sweep = [int(v) for v in args.sweep.split(",") if v]
    if args.tune:
        from convscope.runtime import tune_cpu

        tune_cpu()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} interleaved "
          f"calls; tuned: {args.tune}")
    for name in args.models.split(","):
        fresh(name, args) if args.fresh else bench_model(name, args)


if __name__ == "__main__":
    main()
