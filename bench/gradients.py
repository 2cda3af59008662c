"""Gradient methods vs their peers, same models, same images, same run.

* Grad-CAM and Grad-CAM++ vs pytorch-grad-cam ``GradCAM`` / ``GradCAMPlusPlus`` (same layer, targets)
* guided backprop vs captum ``GuidedBackprop``; saliency vs captum ``Saliency``
* deconv (one channel, whole map) vs captum ``NeuronDeconvolution``; deconv of the top 9 channels
  vs nine ``NeuronDeconvolution`` calls (what a captum user needs for one Zeiler & Fergus figure)

Calls alternate between ours and the peer so both see the same machine load; each time is the
best of ``--repeats`` calls after a warm-up, on the wall clock and in process CPU time. Ratios are
ours / peer (target <= 1.0); the cost of each method is also given in forward passes of the same
model (one no-grad forward = 1.0, CPU time).

captum hooks ``nn.ReLU`` only, so on EfficientNet-Lite (ReLU6) it is timed on a copy with each
ReLU6 split into ``nn.ReLU`` + ``clamp(max=6)``: the computation that gives our numbers. (Run
as-is it skips the rule and returns plain gradients, i.e. the saliency row.)

On a shared machine ``--threads 1`` gives the steadiest ratios: with two OpenMP threads and
other jobs on the cores, timings swing by several times from call to call.

    .venv/bin/python bench/gradients.py [--models efficientnet_lite0,alexnet,vgg16] [--batch 1]
        [--repeats 5] [--threads 1] [--tune]
    .venv/bin/python bench/gradients.py --compare-tuning [--models ...]

``--tune`` calls ``convscope.tune_cpu()`` first (what the CLI does at startup): in one process
it tunes the peers too, so its ratios say what the peers would get with the same tuning.
``--compare-tuning`` runs the whole bench twice, in an untuned and a tuned process (the allocator
setting is process-wide and cannot be undone), and prints ours tuned against the peer untuned (what
a CLI user gets against a peer user's script) and against the peer tuned.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py
from PIL import Image

from convscope.methods.deconvnet import deconv
from convscope.methods.gradcam import gradcam, gradcam_plus_plus
from convscope.methods.guided import guided_backprop, saliency
from convscope.models.load import load_model
from convscope.probes.layers import resolve_layer

DECONV_LAYER = {"efficientnet_lite0": "stage5", "alexnet": "conv5", "vgg16": "block4"}


def photos(count: int) -> list[Image.Image]:
    import skimage

    names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]
    return [Image.open(Path(skimage.data_dir) / names[i % len(names)]).convert("RGB") for i in range(count)]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def timed_pair(ours: Callable[[], Any], peer: Callable[[], Any], repeats: int) -> tuple[float, float, float, float]:
    """Best-of-``repeats`` (wall, cpu) seconds for ours and the peer, calls interleaved."""
    ours(), peer()  # warm-up (allocator, lazy imports)
    mine, theirs = [], []
    for _ in range(repeats):
        mine.append(timed(ours))
        theirs.append(timed(peer))
    return (min(t[0] for t in mine), min(t[1] for t in mine),
            min(t[0] for t in theirs), min(t[1] for t in theirs))


def forward_time(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    with torch.no_grad():
        module(x)
        times = [timed(lambda: module(x)) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def relu6_as_relu_then_clip(module: torch.nn.Module) -> torch.nn.Module:
    """captum hooks nn.ReLU only; this twin gives captum our ReLU6 rule (see relu_rules)."""

    class ClipAt6(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(x, max=6.0)

    twin = copy.deepcopy(module)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ReLU6):
                setattr(parent, name, torch.nn.Sequential(torch.nn.ReLU(), ClipAt6()))
    return twin


Row = tuple[str, str, tuple[float, float, float, float], tuple[float, float]]


def bench_model(name: str, batch: int, repeats: int) -> list[Row]:
    from captum.attr import GuidedBackprop, NeuronDeconvolution, Saliency
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    weights = "pretrained" if name.startswith("efficientnet") else "random"
    loaded = load_model(name, weights, seed=0, device="cpu")
    module = loaded.module
    # captum leaves ReLU6 alone (plain gradients); on its ReLU+clip twin it computes our numbers.
    has_relu6 = any(isinstance(m, torch.nn.ReLU6) for m in module.modules())
    twin = relu6_as_relu_then_clip(module) if has_relu6 else module
    captum_note = " (ReLU6 split)" if has_relu6 else ""
    x = loaded.preprocess.to_tensor(photos(batch))
    with torch.no_grad():
        targets = module(x).argmax(dim=1)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    _, cam_layer = resolve_layer(loaded, loaded.cam_layer)
    layer_name = DECONV_LAYER[name]
    layer_path, _ = resolve_layer(loaded, layer_name)
    channel = int(deconv(loaded, x[:1], layer_name, top=1).channels[0, 0])

    def peer_cam(kind: type) -> Callable[[], Any]:
        def run() -> Any:
            with kind(model=module, target_layers=[cam_layer]) as cam:
                out = cam(input_tensor=x, targets=cam_targets)
            for p in module.parameters():  # pytorch-grad-cam leaves .grad on every parameter
                p.grad = None
            return out

        return run

    neuron = NeuronDeconvolution(twin, dict(twin.named_modules())[layer_path])

    def captum_deconv(c: int) -> Any:
        return neuron.attribute(x.clone(), neuron_selector=lambda out: (out[:, c] * out[:, c].detach()).sum(dim=(1, 2)))

    def captum_top9() -> Any:
        return [captum_deconv(c) for c in range(9)]

    forward = forward_time(module, x, repeats)
    cases = [
        ("gradcam", "pytorch-grad-cam GradCAM",
         lambda: gradcam(loaded, x, target=targets), peer_cam(GradCAM)),
        ("gradcam++", "pytorch-grad-cam GradCAMPlusPlus",
         lambda: gradcam_plus_plus(loaded, x, target=targets), peer_cam(GradCAMPlusPlus)),
        ("guided backprop", "captum GuidedBackprop" + captum_note,
         lambda: guided_backprop(loaded, x, target=targets),
         lambda: GuidedBackprop(twin).attribute(x.clone(), target=targets)),
        ("saliency", "captum Saliency",
         lambda: saliency(loaded, x, target=targets),
         lambda: Saliency(module).attribute(x.clone(), target=targets, abs=True).amax(dim=1)),
        (f"deconv {layer_name} 1 ch", "captum NeuronDeconvolution" + captum_note,
         lambda: deconv(loaded, x, layer_name, channel=channel, location="all"),
         lambda: captum_deconv(channel)),
        (f"deconv {layer_name} 9 ch", "9 x NeuronDeconvolution" + captum_note,
         lambda: deconv(loaded, x, layer_name, channel=list(range(9)), location="all"),
         captum_top9),
    ]
    return [(method, peer_name, timed_pair(ours_fn, peer_fn, repeats), forward)
            for method, peer_name, ours_fn, peer_fn in cases]


def compare_tuning(args: argparse.Namespace) -> None:
    """Run the bench untuned and tuned, each in its own process; ratios across the two."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, extra in (("untuned", []), ("tuned", ["--tune"])):
        cmd = [sys.executable, __file__, "--models", args.models, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--json", *extra]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {label} run done", flush=True)
    header = (f"{'model':<19}{'method':<20}{'ours tuned ms':>14}{'peer untuned':>13}{'peer tuned':>11}"
              f"{'vs untuned':>11}{'vs tuned':>9}{'ours untuned/peer untuned':>27}")
    print("wall-clock ratios ours / peer (<= 1.0 means ours is faster)")
    print(header)
    print("-" * len(header))
    for plain, tuned in zip(runs["untuned"], runs["tuned"], strict=True):
        print(f"{tuned['model']:<19}{tuned['method']:<20}{tuned['ours'] * 1e3:>14.1f}{plain['peer'] * 1e3:>13.1f}"
              f"{tuned['peer'] * 1e3:>11.1f}{tuned['ours'] / plain['peer']:>11.2f}"
              f"{tuned['ours'] / tuned['peer']:>9.2f}{plain['ours'] / plain['peer']:>27.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="efficientnet_lite0,alexnet,vgg16")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--tune", action="store_true", help="convscope.tune_cpu() first (ours and the peers)")
    parser.add_argument("--compare-tuning", action="store_true", help="untuned and tuned processes, compared")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    args = parser.parse_args()
    if args.compare_tuning:
        compare_tuning(args)
        return
    if args.tune:
        from convscope.runtime import tune_cpu

        tune_cpu()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # captum warns on every call that it sets hooks
    rows = []
    if not args.json:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
              f"best of {args.repeats} interleaved calls; wall clock and process CPU time "
              f"(CPU time is steadier when other jobs share the cores); tuned: {args.tune}")
        header = (f"{'model':<19}{'method':<20}{'ours ms':>9}{'peer ms':>9}{'wall':>6}{'cpu':>6}"
                  f"{'ours/fwd':>9}{'peer/fwd':>9}  peer")
        print(header)
        print("-" * (len(header) + 30))
    for name in args.models.split(","):
        for method, peer_name, (wall, cpu, peer_wall, peer_cpu), (fwd_wall, fwd_cpu) in bench_model(
            name, args.batch, args.repeats
        ):
            rows.append({"model": name, "method": method, "peer_name": peer_name, "ours": wall, "peer": peer_wall,
                         "ours_cpu": cpu, "peer_cpu": peer_cpu, "forward_cpu": fwd_cpu})
            row(f"{method} {name}", peer_name, peer_wall / wall, 1.0, detail=f"batch {args.batch}, wall")
            if not args.json:
                print(f"{name:<19}{method:<20}{wall * 1e3:>9.1f}{peer_wall * 1e3:>9.1f}"
                      f"{wall / peer_wall:>6.2f}{cpu / peer_cpu:>6.2f}"
                      f"{cpu / fwd_cpu:>9.2f}{peer_cpu / fwd_cpu:>9.2f}  {peer_name}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
