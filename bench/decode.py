"""Reduced decoding of camera photos: full decode vs ``Preprocess.load_image``, same run.

For a 6000x4000 JPEG and PNG, prints the time to turn one file into the model's input tensor
both ways and their ratio, the pixel difference between the two tensors, and the resident
memory a fresh process adds to keep a batch of decoded photos the way ``classify`` used to
(full decodes) and does now (input tensors of reduced decodes).

    .venv/bin/python bench/decode.py [--batch 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image

from convscope.imageio import load_image
from convscope.preprocess import IMAGENET


def make_photos(folder: Path) -> dict[str, Path]:
    import skimage.data

    photo = Image.fromarray(skimage.data.chelsea()).resize((6000, 4000), Image.Resampling.BILINEAR)
    paths = {"jpeg": folder / "photo.jpg", "png": folder / "photo.png"}
    photo.save(paths["jpeg"], quality=90)
    photo.save(paths["png"], compress_level=1)
    return paths


def seconds(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


HOLD = textwrap.dedent(
    """
    import os, sys
    from convscope.imageio import load_image
    from convscope.preprocess import IMAGENET

    def resident():  # current RSS in MiB (ru_maxrss would still show the torch import's peak)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    before = resident()
    if mode == "full":  # what classify kept before: the decoded photos of a batch
        kept = [load_image(path) for _ in range(count)]
    else:  # what it keeps now: one input tensor per photo
        kept = [IMAGENET.to_tensor(IMAGENET.load_image(path)) for _ in range(count)]
    print(resident() - before)
    """
)


def held_mib(path: Path, mode: str, count: int) -> float:
    done = subprocess.run([sys.executable, "-c", HOLD, str(path), mode, str(count)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pre = IMAGENET
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in make_photos(Path(tmp)).items():
            full = seconds(lambda: pre.to_tensor(load_image(path)), args.repeat)  # noqa: B023
            reduced = seconds(lambda: pre.to_tensor(pre.load_image(path)), args.repeat)  # noqa: B023
            difference = ((pre.to_tensor(load_image(path)) - pre.to_tensor(pre.load_image(path))) * std * 255).abs()
            held_full = held_mib(path, "full", args.batch)
            held_reduced = held_mib(path, "reduced", args.batch)
            print(
                f"{kind} 6000x4000 -> 224x224: full decode {full * 1000:.0f} ms, reduced {reduced * 1000:.0f} ms "
                f"({full / reduced:.1f}x faster); tensor difference mean {float(difference.mean()):.2f}/255, "
                f"max {float(difference.max()):.0f}/255"
            )
            print(
                f"  batch of {args.batch} held: full decodes +{held_full:.0f} MiB RSS, "
                f"input tensors of reduced decodes +{held_reduced:.1f} MiB ({held_full / max(held_reduced, 0.1):.0f}x less)"
            )
    print(f"(this process peaked at {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
