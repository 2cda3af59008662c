"""LRP vs zennit, same composite, same models, same photos, same run.

* ``epsilon-gamma-box`` on VGG16 (zennit's flagship: ``EpsilonGammaBox`` + ``VGGCanonizer``)
* ``epsilon-plus-flat`` on the default model (EfficientNet-Lite0, pretrained) and on ResNet-50
  (``EpsilonPlusFlat`` with BatchNorm merged and zennit's ``Sum`` in each residual block)

Calls alternate between ours and zennit so both see the same machine load; each time is the
best of ``--repeats`` calls after a warm-up (wall clock). The ratio is zennit's time / ours
(target >= 1.5); the max relative difference is ``max|ours - zennit| / max|zennit|``.

The zennit side uses its BatchNorm merge with the emptied BatchNorm an exact identity (see
``tests/test_lrp.py``: zennit keeps ``eps`` in it, which moves EfficientNet's forward values by
5e-4 per BatchNorm); that changes no timing. Random VGG16/ResNet-50 weights are seeded, and
ResNet-50's BatchNorm statistics are re-estimated on the photos.

    .venv/bin/python bench/lrp.py [--cases vgg16,efficientnet_lite0,resnet50] [--batch 2]
        [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py
from PIL import Image

from convscope.methods._common import prepare
from convscope.methods.lrp import lrp
from convscope.models.load import load_model
from convscope.probes.lrp_rules import box_bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import recalibrated
from test_lrp import ExactMerge, _mbconv_sum, zennit_lrp
from zennit.canonizers import AttributeCanonizer
from zennit.torchvision import ResNetBottleneckCanonizer

CASES = {  # model -> (composite, zennit canonizers)
    "vgg16": ("epsilon-gamma-box", list),
    "efficientnet_lite0": ("epsilon-plus-flat", lambda: [ExactMerge(), AttributeCanonizer(_mbconv_sum)]),
    "resnet50": ("epsilon-plus-flat", lambda: [ExactMerge(), ResNetBottleneckCanonizer()]),
}


def photos(count: int) -> list[Image.Image]:
    import skimage

    names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]
    return [Image.open(Path(skimage.data_dir) / names[i % len(names)]).convert("RGB") for i in range(count)]


def best_pair(ours: Callable[[], Any], peer: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` wall seconds for ours and the peer, calls interleaved after a warm-up."""
    ours(), peer()
    mine, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        mine.append(time.perf_counter() - start)
        start = time.perf_counter()
        peer()
        theirs.append(time.perf_counter() - start)
    return min(mine), min(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="vgg16,efficientnet_lite0,resnet50")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = photos(args.batch)
    print(f"{'model':<20}{'composite':<22}{'ours ms':>10}{'zennit ms':>11}{'ratio':>8}{'max rel diff':>14}")
    for name in args.cases.split(","):
        composite, canonizers = CASES[name]
        loaded = load_model(name, weights=None if name == "efficientnet_lite0" else "random")
        _, batch = prepare(loaded, images)
        if name == "resnet50":
            recalibrated(loaded.module, batch)
        low, high = box_bounds(loaded.preprocess.mean, loaded.preprocess.std)
        ours = partial(lrp, loaded, batch, composite=composite)
        targets = ours().targets
        peer = partial(zennit_lrp, loaded.module, batch, targets, composite, canonizers(), low, high)
        theirs = peer()
        difference = float((ours().attributions - theirs).abs().max() / theirs.abs().max())
        wall, peer_wall = best_pair(ours, peer, args.repeats)
        ratio = peer_wall / wall
        print(f"{name:<20}{composite:<22}{wall * 1e3:>10.0f}{peer_wall * 1e3:>11.0f}{ratio:>8.2f}{difference:>14.1e}",
              flush=True)
        row(f"LRP {composite} {name}", f"zennit {composite}", ratio, 1.5,
            detail=f"batch {args.batch}, wall, max rel diff {difference:.1e}")


if __name__ == "__main__":
    main()
