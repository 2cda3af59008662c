"""Score-CAM vs pytorch-grad-cam's ``ScoreCAM``, and the cost of a deletion curve.

1. Score-CAM: same model (pretrained EfficientNet-Lite0), same layer, same photo, same target,
   in one run; calls alternate so both see the same machine load. Prints wall and process-CPU
   seconds, ours / peer ratios (target <= 0.5, i.e. >= 2x faster), the largest map difference,
   and both costs in single-image forwards. The peer runs one forward per channel in batches of
   16 with an ``.item()`` per output; ours runs every non-dead channel in batches of 64,
   channels-last, and the all-zero channels (dead ReLUs) once.
2. Deletion/insertion: one 50-step deletion curve (``step = ceil(224 * 224 / 50)``) in units of
   one single-image forward, next to one batched forward of 50 copies, and the copies it ran.

    .venv/bin/python bench/scorecam.py [--layers stage6,head] [--repeats 1] [--threads 0]
"""

from __future__ import annotations

import argparse
import math
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import skimage
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

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
        _, module = resolve_layer(loaded, layer)
        best_ours, best_peer = (math.inf, math.inf), (math.inf, math.inf)
        ours_maps = peer_maps = None
        for _ in range(args.repeats):
            wall, cpu, result = timed(lambda layer=layer: scorecam(loaded, x, layer=layer))
            best_ours = (min(best_ours[0], wall), min(best_ours[1], cpu))
            ours_maps = result
            print(f"scorecam {layer}: ours {wall:.2f} s wall / {cpu:.2f} s CPU", flush=True)
            target = [ClassifierOutputTarget(int(result.targets[0]))]

            def peer(module: Any = module, target: Any = target) -> Any:
                with ScoreCAM(model=net, target_layers=[module]) as cam:
                    return cam(input_tensor=x, targets=target)

            wall, cpu, peer_maps = timed(peer)
            best_peer = (min(best_peer[0], wall), min(best_peer[1], cpu))
        assert ours_maps is not None and peer_maps is not None
        diff = float((ours_maps.maps - torch.from_numpy(peer_maps)).abs().max())
        channels = ours_maps.weights.shape[1]
        print(f"scorecam {layer} ({channels} channels): ours {best_ours[0]:.2f} s wall / {best_ours[1]:.2f} s CPU "
              f"= {best_ours[0] / one_wall:.0f} forwards; pytorch-grad-cam {best_peer[0]:.2f} s / {best_peer[1]:.2f} s "
              f"= {best_peer[0] / one_wall:.0f} forwards; ratio ours/peer wall {best_ours[0] / best_peer[0]:.3f} "
              f"(x{best_peer[0] / best_ours[0]:.1f} faster), CPU {best_ours[1] / best_peer[1]:.3f}; "
              f"max |map difference| {diff:.2e}", flush=True)
        row(f"Score-CAM {layer}", "pytorch-grad-cam ScoreCAM", best_peer[0] / best_ours[0], 1.5,
            detail=f"{channels} channels, max diff {diff:.1e}")


if __name__ == "__main__":
    main()
