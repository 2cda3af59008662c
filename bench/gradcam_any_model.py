"""Grad-CAM on models convscope did not build, against pytorch-grad-cam, same run.

``torchvision:resnet50`` at its default layer (``layer4``) and ``timm:convnext_tiny`` at its
default layer and at an NHWC layer inside the last block (which the peer reads through its
documented ``reshape_transform``). Random weights with BatchNorm statistics re-estimated on
photos (so the maps are real maps, not 1e-15 noise); the maps are checked equal (1e-4) before
anything is timed. Includes convscope's layout measurement: the first call of a process pays
one traced forward, which is timed separately and then cached.

Calls alternate between ours and the peer; each time is the best of ``--repeats`` after a
warm-up. The ratio printed is peer / ours: how many times faster convscope is (target >= 2).

    .venv/bin/python bench/gradcam_any_model.py [--batch 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def photos(count: int) -> list[Image.Image]:
    import skimage

    names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]
    return [Image.open(Path(skimage.data_dir) / names[i % len(names)]).convert("RGB") for i in range(count)]


def calibrated(module: torch.nn.Module, batch: torch.Tensor) -> torch.nn.Module:
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            sub.reset_running_stats()
            sub.momentum = None
    module.train()
    with torch.no_grad():
        module(batch)
    return module.eval()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(spec: str) -> torch.nn.Module:
    kind, name = spec.split(":", 1)
    torch.manual_seed(0)
    if kind == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)().eval()
    import timm

    return timm.create_model(name).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import convscope
    from convscope.probes.layers import map_layer
    from convscope.validate import image_batch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}")
    print(f"{'model':26s} {'layer':28s} {'layout':8s} {'ours s':>8s} {'peer s':>8s} {'faster':>7s}  max |diff|")
    worst = float("inf")
    for spec, extra in (("torchvision:resnet50", None), ("timm:convnext_tiny", "stages.3.blocks.2.mlp.fc1")):
        module = build(spec)
        loaded = convscope.wrap_model(module, name=spec)
        batch = image_batch(loaded, photos(args.batch))
        calibrated(module, batch)
        for layer in [loaded.cam_layer] + ([extra] if extra else []):
            start = time.perf_counter()
            found = map_layer(loaded, layer, batch.shape[1:])
            trace = time.perf_counter() - start
            targets = convscope.gradcam(loaded, batch, layer=layer).targets.tolist()

            def transform(t: torch.Tensor, kind: str = found.layout.kind) -> torch.Tensor:
                return t.permute(0, 3, 1, 2) if kind == "NHWC" else t

            cam = GradCAM(model=module, target_layers=[module.get_submodule(found.path)], reshape_transform=transform)
            peer_targets = [ClassifierOutputTarget(t) for t in targets]

            def ours(layer: str = layer, loaded: Any = loaded, batch: torch.Tensor = batch,
                     targets: list[int] = targets) -> Any:
                return convscope.gradcam(loaded, batch, target=targets, layer=layer).maps

            def peer(cam: Any = cam, peer_targets: list[Any] = peer_targets, batch: torch.Tensor = batch) -> Any:
                return cam(input_tensor=batch, targets=peer_targets)

            diff = float(np.abs(ours().numpy() - peer()).max())
            if diff > 1e-4:
                sys.exit(f"{spec} {layer}: maps differ by {diff:.2e}; not timing unequal work")
            mine, theirs = [], []
            for _ in range(args.repeats):  # interleaved: both see the same load
                mine.append(timed(ours))
                theirs.append(timed(peer))
            ratio = min(theirs) / min(mine)
            worst = min(worst, ratio)
            print(f"{spec:26s} {layer:28s} {found.layout.kind:8s} {min(mine):8.3f} {min(theirs):8.3f} {ratio:6.2f}x  {diff:.1e}"
                  f"   (layout trace, first call only: {trace:.2f} s)")
            cam.activations_and_grads.release()
    print(f"slowest ratio: {worst:.2f}x faster than pytorch-grad-cam (target >= 2)")


if __name__ == "__main__":
    main()
