"""Pixel-Flipping: convscope's batched ``quantus_protocol`` vs Quantus' ``PixelFlipping``.

Same model, same images, same saliency maps and targets, in one run; the two alternate per
repeat so both see the same machine load. Prints the wall seconds of each, the ratio
(Quantus / ours), the forwards each ran, and the largest curve difference (equal values: <= 1e-5).

Two settings:

- ``mnist``: Quantus' tutorial scale, a 28x28 grey net (``zfnet_mnist``, seeded random weights)
  and Quantus' default ``features_in_step=1``: 784 steps per image. Quantus runs one Python step
  (copy, baseline, checks, one forward of the N images) per feature; ours runs the N x 784 copies
  in batched forwards.
- ``fashion``: the same net and steps on the first Fashion-MNIST test images (the data the net is
  for; about half of each image is background at the image's minimum, Quantus' "black", so the
  steps flipping it repeat the copy before them and ours does not run them again).
- ``imagenet``: the pretrained default model at 224x224 with ``features_in_step=224*224/8``
  (24 steps per image).

Both sides run the same number of image forwards; ours runs them as chunks of up to 1024 copies
(bounded by a memory budget), Quantus as one forward of the N images per step. On 28x28 inputs the
per-forward overhead is most of Quantus' cost: chunks of 16 copies gave 1.3x, chunks of 512 6.6x
(measured in one run, machine under load). At 224x224 both are compute-bound (about 1.5x). A
larger gain would need fewer or cheaper forwards (an incremental forward that recomputes only the
flipped pixels' receptive fields, as the occlusion engine does for squares).

    .venv/bin/python bench/pixelflipping.py [--setting mnist|fashion|imagenet|all] [--images 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py
from PIL import Image

from convscope.analysis.faithfulness import quantus_protocol
from convscope.methods.guided import saliency
from convscope.models.load import load_model
from convscope.types import LoadedModel

DATA = Path(__file__).resolve().parents[1] / "convscope" / "data"


def photos(count: int) -> list[Image.Image]:
    import skimage.data

    pool = [Image.open(DATA / "chelsea.jpg").convert("RGB"), Image.open(DATA / "coffee.jpg").convert("RGB")]
    pool += [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
             for name in ("astronaut", "rocket", "coffee", "chelsea", "camera", "moon")]
    return [pool[i % len(pool)] for i in range(count)]


def inputs(setting: str, count: int) -> tuple[LoadedModel, torch.Tensor, int]:
    if setting == "fashion":
        from convscope.dataset.sources import fashion_mnist_source

        torch.manual_seed(0)
        loaded = load_model("zfnet_mnist", weights="random")
        source = fashion_mnist_source("test", loaded.preprocess)
        return loaded, next(iter(source.batches(range(count), count))).images, 1
    if setting == "mnist":
        torch.manual_seed(0)
        loaded = load_model("zfnet_mnist", weights="random")
        images = [p.convert("L").resize((28, 28), Image.Resampling.BILINEAR) for p in photos(count)]
        return loaded, loaded.preprocess.to_tensor(images), 1
    loaded = load_model("efficientnet_lite0")
    return loaded, loaded.preprocess.to_tensor(photos(count)), 224 * 224 // 8


SETTINGS = ("mnist", "fashion", "imagenet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=(*SETTINGS, "all"), default="all")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import quantus

    for setting in SETTINGS if args.setting == "all" else (args.setting,):
        loaded, batch, step = inputs(setting, args.images)
        explained = saliency(loaded, batch)
        targets, maps = explained.targets, explained.maps
        metric = quantus.PixelFlipping(features_in_step=step, disable_warnings=True)
        best_ours = best_peer = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = quantus_protocol(loaded, batch, {"saliency": maps}, targets, metrics=("pixel_flipping",),
                                    features_in_step=step).curves["saliency"]["pixel_flipping"]
            best_ours = min(best_ours, time.perf_counter() - start)
            start = time.perf_counter()
            peer = np.asarray(metric(model=loaded.module, x_batch=batch.numpy(), y_batch=targets.numpy(),
                                     a_batch=maps.numpy(), device=str(batch.device)))
            best_peer = min(best_peer, time.perf_counter() - start)
        error = float(np.abs(peer - ours.values.numpy()).max())
        steps = ours.values.shape[1]
        copies = ours.values.numel()
        print(f"{setting}: {loaded.name}, {len(batch)} images {tuple(batch.shape[1:])}, features_in_step={step}, "
              f"{steps} steps per image; Quantus ran {copies} copies, ours {ours.forwards} (a step that flips only "
              "features already black repeats the copy before it)")
        print(f"  quantus {best_peer:.3f} s   ours {best_ours:.3f} s   ratio {best_peer / best_ours:.1f}x   "
              f"max |curve difference| {error:.2e}")
        what = "Fashion-MNIST" if setting == "fashion" else "photos"
        row(f"PixelFlipping {loaded.name} ({len(batch)} {what}, {steps} steps)", "Quantus 0.6 PixelFlipping",
            best_peer / best_ours, 10.0, detail=f"features_in_step {step}, copies run {ours.forwards} of {copies}, "
                                                f"max diff {error:.1e}")


if __name__ == "__main__":
    main()
