"""Classification throughput: convscope vs a plain hand-written torchvision loop, same run.

Prints images/s for both on the same folder, model and batch size, and their ratio
(target >= 0.95), then the cost of capturing every conv stage in one pass relative to a plain
forward pass (target <= 1.1x).

    .venv/bin/python bench/classify.py [--model efficientnet_lite0] [--images 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

import convscope
from convscope.imageio import iter_images, load_image
from convscope.methods.activations import activation_maps
from convscope.probes.hooks import capture
from convscope.probes.layers import resolve_layers


def make_folder(folder: Path, count: int) -> None:
    import skimage

    sources = [Image.open(Path(skimage.data_dir) / n).convert("RGB")
               for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    for i in range(count):
        image = sources[i % len(sources)]
        scale = 0.8 + 0.1 * (i % 5)
        image.resize((int(image.width * scale), int(image.height * scale))).save(folder / f"{i:04d}.jpg", quality=90)


def plain_loop(model: torch.nn.Module, paths: list[Path], batch_size: int, pre) -> list[int]:
    """What a user would write by hand with torchvision."""
    transform = T.Compose([T.Resize(pre.resize), T.CenterCrop(pre.crop), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    top = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            top += torch.softmax(model(batch), dim=1).topk(5).indices[:, 0].tolist()
    return top


def ours(loaded, paths: list[Path], batch_size: int) -> list[int]:
    """What `convscope classify FOLDER` does: safe decode, preset, batched classify."""
    top = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        top += [int(p.indices[0]) for p in convscope.classify(loaded, images, topk=5, batch_size=batch_size)]
    return top


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    weights = "pretrained" if args.model.startswith("efficientnet") else "random"
    loaded = convscope.load_model(args.model, weights=weights, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(folder, args.images)
        paths = iter_images([folder])
        assert ours(loaded, paths[:4], 4) == plain_loop(loaded.module, paths[:4], 4, loaded.preprocess)
        ours(loaded, paths[:args.batch_size], args.batch_size)  # warm-up
        # Interleave the two so drift on a shared machine hits both alike.
        t_plain, t_ours = [], []
        for _ in range(args.repeats):
            t_plain.append(best_of(lambda: plain_loop(loaded.module, paths, args.batch_size, loaded.preprocess), 1)[0])
            t_ours.append(best_of(lambda: ours(loaded, paths, args.batch_size), 1)[0])
        plain_ips = len(paths) / min(t_plain)
        ours_ips = len(paths) / min(t_ours)
        print(f"model {args.model}, {len(paths)} images, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads")
        print(f"  plain torchvision loop : {plain_ips:7.2f} img/s")
        print(f"  convscope classify     : {ours_ips:7.2f} img/s")
        print(f"  ratio (ours / plain)   : {ours_ips / plain_ips:7.3f}   (target >= 0.95)")

    x = torch.randn(args.batch_size, *loaded.preprocess.input_size)
    modules = resolve_layers(loaded, list(loaded.stages))

    def forward_only() -> None:
        with torch.inference_mode():
            loaded.module(x)

    def capture_all() -> None:
        with torch.inference_mode(), capture(loaded.module, modules):
            loaded.module(x)

    def maps_all() -> None:
        activation_maps(loaded, x)

    forward_only()
    fwd = min(best_of(forward_only, 1)[0] for _ in range(args.repeats * 2))
    cap = min(best_of(capture_all, 1)[0] for _ in range(args.repeats * 2))
    maps = min(best_of(maps_all, 1)[0] for _ in range(args.repeats * 2))
    print(f"one-pass capture of {len(modules)} stages, batch {args.batch_size}:")
    print(f"  forward only           : {fwd * 1000:8.1f} ms")
    print(f"  forward + capture all  : {cap * 1000:8.1f} ms   ratio {cap / fwd:5.3f} (target <= 1.1)")
    print(f"  full activation_maps   : {maps * 1000:8.1f} ms   ratio {maps / fwd:5.3f} (incl. upsampling)")


if __name__ == "__main__":
    main()
