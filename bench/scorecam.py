"""Score-CAM vs pytorch-grad-cam's ``ScoreCAM``, and the cost of a deletion curve.

1. Score-CAM: same model (pretrained EfficientNet-Lite0), same layer, same photo, same target
   (its top-1), in one run. Each timed call runs in a fresh process (one call, after one
   warm-up forward), and the sides alternate so all see the same machine load: ours, the peer
   as its users run it, and the peer with our allocator settings (``tune_cpu``), so the gain
   from the allocator is visible apart from the rest. Prints wall and process-CPU seconds, the
   ratios (target >= 1.5x) and the largest map difference. The peer runs one forward per
   channel in batches of 16 with an ``.item()`` per output; ours runs the non-dead channels
   through a BatchNorm-folded copy in batches of 16 with the allocator tuned around the call,
   and all-zero channels (dead ReLUs) once. ``ours-bf16`` is ours under ``--precision bf16``
   (autocast where the CPU has AMX or AVX-512-BF16, depthwise layers in float32: ``probes.mixed``),
   with its map's correlation to our float32 map (target 0.999).
2. Deletion/insertion: one 50-step deletion curve (``step = ceil(224 * 224 / 50)``) in units of
   one single-image forward, next to one batched forward of 50 copies, and the copies it ran.

    .venv/bin/python bench/scorecam.py [--layers stage6,head] [--repeats 1] [--threads 0]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py
from PIL import Image

from convscope.analysis.quality import Protocol, causal_curves
from convscope.methods.gradcam import gradcam
from convscope.methods.scorecam import scorecam
from convscope.models.load import load_model
from convscope.probes.layers import resolve_layer
from convscope.runtime import inference_precision, native_bf16, tune_cpu


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def forward_seconds(net: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    best = (math.inf, math.inf)
    with torch.inference_mode():
        net(x)
        for _ in range(repeats):
            wall, cpu, _ = timed(lambda: net(x))
            best = (min(best[0], wall), min(best[1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="stage6,head")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.layers, args.out)
        return
    warnings.filterwarnings("ignore")
    import skimage

    loaded = load_model("efficientnet_lite0", device="cpu")
    net = loaded.module.eval()
    photo = Image.open(Path(skimage.data_dir) / "chelsea.png").convert("RGB")
    x = loaded.preprocess.to_tensor(photo)
    one_wall, one_cpu = forward_seconds(net, x)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; one forward of 1 image: "
          f"{one_wall * 1e3:.1f} ms wall, {one_cpu * 1e3:.1f} ms CPU")

    cam = gradcam(loaded, x)
    steps = 50
    protocol = Protocol(step=math.ceil(224 * 224 / steps))
    with torch.inference_mode():
        clean = torch.softmax(net(x).float(), 1).gather(1, cam.targets[:, None])[:, 0]
    wall, cpu, (deletion, _) = timed(lambda: causal_curves(loaded, x, cam.maps, cam.targets, protocol, clean=clean))
    fifty_wall, _ = forward_seconds(net, x.repeat(50, 1, 1, 1).contiguous(memory_format=torch.channels_last), 2)
    print(f"deletion + insertion, {steps} steps each (step {protocol.step} px): {wall:.2f} s wall / {cpu:.2f} s CPU "
          f"for both curves; copies run: deletion {deletion.forwards}, insertion {deletion.forwards}; "
          f"per curve {wall / 2 / one_wall:.1f} single-image forwards (wall), {cpu / 2 / one_cpu:.1f} (CPU); "
          f"one batched forward of 50 copies = {fifty_wall / one_wall:.1f} single-image forwards; "
          f"curve / batched-50 = {wall / 2 / fifty_wall:.2f}", flush=True)

    for layer in args.layers.split(","):
        best: dict[str, tuple[float, float]] = {}
        maps: dict[str, torch.Tensor] = {}
        channels = 0
        for _ in range(args.repeats):
            for side in SIDES:  # alternating, so every side sees the same machine load
                wall, cpu, side_maps, side_channels = run_side(side, layer, args.threads)
                channels = max(channels, side_channels)
                old = best.get(side, (math.inf, math.inf))
                best[side] = (min(old[0], wall), min(old[1], cpu))
                maps[side] = side_maps
                print(f"scorecam {layer} {side}: {wall:.2f} s wall / {cpu:.2f} s CPU", flush=True)
        diff = float((maps["ours"] - maps["peer"]).abs().max())
        ours, peer, tuned = best["ours"], best["peer"], best["peer-tuned"]
        print(f"scorecam {layer} ({channels} channels): ours {ours[0]:.2f} s wall / {ours[1]:.2f} s CPU "
              f"= {ours[0] / one_wall:.0f} forwards; pytorch-grad-cam {peer[0]:.2f} s / {peer[1]:.2f} s "
              f"= {peer[0] / one_wall:.0f} forwards, with our allocator settings {tuned[0]:.2f} s; "
              f"x{peer[0] / ours[0]:.2f} faster (x{tuned[0] / ours[0]:.2f} against the tuned peer); "
              f"max |map difference| {diff:.2e}", flush=True)
        row(f"Score-CAM {layer}", "pytorch-grad-cam ScoreCAM", peer[0] / ours[0], 1.5,
            detail=f"{channels} channels, each side in a fresh process; x{tuned[0] / ours[0]:.2f} against the "
                   f"peer with our allocator settings; max diff {diff:.1e}")
        low = best["ours-bf16"]
        correlation = float(torch.corrcoef(torch.stack([maps["ours-bf16"].flatten(), maps["ours"].flatten()]))[0, 1])
        native, why = native_bf16("cpu")
        print(f"scorecam {layer} --precision bf16: {low[0]:.2f} s wall, x{peer[0] / low[0]:.2f} the peer, "
              f"x{ours[0] / low[0]:.2f} our float32; correlation with the float32 map {correlation:.5f}; {why}",
              flush=True)
        row(f"Score-CAM {layer} --precision bf16", "pytorch-grad-cam ScoreCAM (float32)", peer[0] / low[0], 3.0,
            detail=f"correlation with float32 {correlation:.4f} (target 0.999); {why if native else 'emulated: ' + why}"
                   "; the issue's target is for CPUs with AMX")


# Each side runs in its own fresh process, so that what one side leaves in the allocator (ours
# tunes it around the call) cannot speed up or slow down the other. "peer-tuned" is the peer
# in a process where convscope.tune_cpu() ran first: the same allocator settings as ours.
SIDES = ("ours", "ours-bf16", "peer", "peer-tuned")


def run_side(side: str, layer: str, threads: int) -> tuple[float, float, torch.Tensor, int]:
    """One timed call of ``side`` in a fresh process: wall, CPU, maps and channels."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "maps.pt"
        subprocess.run([sys.executable, __file__, "--worker", side, "--layers", layer, "--threads", str(threads),
                        "--out", str(out)], check=True)
        found = torch.load(out)
    return found["wall"], found["cpu"], found["maps"], found["channels"]


def worker(side: str, layer: str, out: Path) -> None:
    """The body of ``run_side``: load, warm up one forward, time one call, save."""
    warnings.filterwarnings("ignore")
    import skimage

    loaded = load_model("efficientnet_lite0", device="cpu")
    net = loaded.module.eval()
    x = loaded.preprocess.to_tensor(Image.open(Path(skimage.data_dir) / "chelsea.png").convert("RGB"))
    with torch.inference_mode():
        target = int(net(x).argmax())
    if side in ("ours", "ours-bf16"):
        precision = "bf16" if side == "ours-bf16" else "float32"

        def ours() -> Any:  # as `convscope scorecam --precision bf16` runs it
            with inference_precision(precision):
                return scorecam(loaded, x, layer=layer, target=target)

        wall, cpu, result = timed(ours)
        maps, channels = result.maps, int(result.weights.shape[1])
    else:
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if side == "peer-tuned":
            tune_cpu()
        _, module = resolve_layer(loaded, layer)

        def peer() -> Any:
            with ScoreCAM(model=net, target_layers=[module]) as cam:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])

        wall, cpu, found = timed(peer)
        maps, channels = torch.from_numpy(found), 0
    torch.save({"wall": wall, "cpu": cpu, "maps": maps, "channels": channels}, out)


if __name__ == "__main__":
    main()
