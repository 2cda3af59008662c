"""Wall time of ``convscope atlas``, whole process, with its parts named (issue 20).

Two cases:
- ``fashion``: the Fashion-MNIST model on the 60,000 training images, every layer (conv1-conv5,
  352 units); weights from ``--weights`` (a ``convscope train`` checkpoint; default: seeded random);
- ``photos``: the pretrained default model (EfficientNet-Lite0) on a folder of 500 photos, two
  stages. The folder is made from the real photos that ship in scikit-image, scikit-learn,
  matplotlib and convscope: random crops, flips and resizes of them (seeded), written as JPEG.

Each case prints the command, its total wall time and the parts the command reports in its
manifest (mining, relevance, feature visualisation, drawing); the rest is start-up, loading the
model and writing. Feature-visualisation settings are printed with the times: they dominate.

Usage: python bench/atlas.py [--cases fashion,photos] [--weights runs/fm/best.pt]
       [--photos-channels 0-31] [--steps 256] [--size 128]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def real_photos() -> list[Path]:
    import matplotlib
    import skimage
    import sklearn

    import convscope

    patterns = [
        Path(skimage.__file__).parent / "data" / "*.png", Path(skimage.__file__).parent / "data" / "*.jpg",
        Path(sklearn.__file__).parent / "datasets" / "images" / "*.jpg",
        Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "*.jpg",
        Path(convscope.__file__).parent / "data" / "*.jpg",
    ]
    return sorted(Path(p) for pattern in patterns for p in glob.glob(str(pattern)))


def photo_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs cut from the real photos: a random crop (half to all of each side), a flip
    half of the time, resized to 256 px on the shorter side."""
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in real_photos()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = 256 / min(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))))
        crop.save(folder / f"photo_{i:04d}.jpg", quality=90)
    return folder


def run_case(name: str, args: list[str], out: Path) -> None:
    command = [sys.executable, "-m", "convscope", "atlas", *args, "-o", str(out)]
    print(f"\n{name}: convscope atlas {' '.join(args)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"  failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        return
    manifest = json.loads((out / "manifest.json").read_text())
    options = manifest["options"]
    timings = options["timings"]
    parts = sum(timings.values())
    print(f"  {options['images']} images, {sum(1 for _ in out.rglob('*.html')) - 1} pages, wall {seconds:.1f} s")
    for key, value in timings.items():
        print(f"  {key.removesuffix('_seconds'):<12} {value:8.1f} s  ({value / seconds:5.1%})")
    print(f"  {'other':<12} {seconds - parts:8.1f} s  (start-up, model, writing the manifest)")
    print(f"  featurevis settings: {options['featurevis']} in batches of {options['featurevis_batch']} units")
    print(f"  load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="fashion,photos")
    parser.add_argument("--weights", default="random", help="the Fashion-MNIST model's weights")
    parser.add_argument("--images", type=int, default=500, help="photos in the folder of the photos case")
    parser.add_argument("--photos-channels", default="0-31")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="featurevis side for the photos case")
    options = parser.parse_args()
    cases = options.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "fashion" in cases:
            run_case("fashion", ["fashion-mnist", "--model", "zfnet_mnist", "--weights", options.weights,
                                 *[a for layer in ("conv1", "conv2", "conv3", "conv4", "conv5") for a in ("--layer", layer)],
                                 "--featurevis-steps", str(options.steps), "-b", "256"], root / "fashion")
        if "photos" in cases:
            folder = photo_folder(root / "photos", options.images)
            run_case("photos", [str(folder), "--layer", "stage3", "--layer", "stage5", "--channels",
                                options.photos_channels, "--featurevis-steps", str(options.steps),
                                "--featurevis-size", str(options.size)], root / "photos-atlas")


if __name__ == "__main__":
    main()
