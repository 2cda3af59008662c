"""Dataset patches (issue 9): what the miner costs, in one run.

1. Mining throughput: ``top_patches`` (the ``--no-projections`` mining pass, all conv stages,
   every channel) against forward-only passes of the same model over the same data loading
   (``ImageSource.batches``) and batch size. Each repeat runs forward, mining, mining,
   forward; best of the ``2 x --repeats`` samples of each. Target >= 0.95x (issue 22).
2. Peak RSS of a mining process over 10,000 vs 60,000 Fashion-MNIST images (the test and the
   train split, each mined in a fresh subprocess): memory must not grow with the dataset.
3. ``torchrun --nproc-per-node 2`` against one process, on the CLI, mining only.
4. (``--command-photos N``) The whole ``convscope patches`` command on N real photos
   (EfficientNet-Lite0, ``--layer stage6 --no-projections``) against a plain forward-only script
   over the same folder, whole process against whole process (issue 22, item 2). Target >= 0.9x.

Prints ``uptime`` first: other jobs on the machine move the absolute numbers; ratios are
measured back to back.

    python bench/patches.py [--model zfnet_mnist] [--images 10000] [-b 128] [--rss-model tiny]
                            [--skip-throughput] [--skip-rss] [--skip-dist]
                            [--command-photos 256] [--command-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py

ROOT = Path(__file__).resolve().parents[1]


def throughput(model_name: str, images: int, batch_size: int, repeats: int) -> None:
    from convscope.dataset.patches import top_patches
    from convscope.dataset.sources import IdxSource, fashion_mnist_source
    from convscope.models.load import load_model

    loaded = load_model(model_name, "random")
    source = fashion_mnist_source("train", loaded.preprocess)
    source.count = min(images, len(source))  # the first N images
    assert isinstance(source, IdxSource)
    layers = list(loaded.stages)

    def forward_only() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in source.batches(range(len(source)), batch_size):
                loaded.module(batch.images)
        return len(source) / (time.perf_counter() - start)

    def mining() -> float:
        start = time.perf_counter()
        top_patches(loaded, source, layers, top=9, batch_size=batch_size)
        return len(source) / (time.perf_counter() - start)

    forward_only()  # warm-up (allocator, oneDNN primitives)
    forwards: list[float] = []
    minings: list[float] = []
    for _ in range(repeats):
        # Both orders in each repeat (F M M F): on a shared machine a busy spell slows one pass
        # several-fold, and the best of four samples each is far steadier than the best of two.
        forwards.append(forward_only())
        minings += [mining(), mining()]
        forwards.append(forward_only())
    best_forward, best_mining = max(forwards), max(minings)
    channels = sum(1 for _ in layers)
    print(f"[1] {model_name}, {len(source)} Fashion-MNIST images, batch {batch_size}, layers {','.join(layers)} "
          f"({channels} layers, all channels), best of {2 * repeats}")
    print(f"    forward only : {best_forward:8.0f} img/s   (runs: {', '.join(f'{v:.0f}' for v in forwards)})")
    print(f"    mining pass  : {best_mining:8.0f} img/s   (runs: {', '.join(f'{v:.0f}' for v in minings)})")
    print(f"    ratio {best_mining / best_forward:.2f}x (target >= 0.95x)")
    row(f"mining {model_name}", "forward-only loop", best_mining / best_forward, 0.95, unit="x of forward speed",
        detail=f"{len(source)} images, batch {batch_size}")


def rss_child(split: str, model_name: str, batch_size: int) -> None:
    from convscope.dataset.patches import top_patches
    from convscope.models.load import load_model

    loaded = load_model(model_name, "random")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    index = top_patches(loaded, f"fashion-mnist:{split}", list(loaded.stages), batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": index.images, "before_kb": before, "peak_kb": peak, "seconds": seconds}))


def rss(model_name: str, batch_size: int) -> None:
    results = {}
    for split in ("test", "train"):
        run = subprocess.run(
            [sys.executable, __file__, "--rss-child", split, "--model", model_name, "-b", str(batch_size)],
            check=True, capture_output=True, text=True,
        )
        results[split] = json.loads(run.stdout.strip().splitlines()[-1])
    small, large = results["test"], results["train"]
    print(f"[2] peak RSS of a mining process ({model_name}, batch {batch_size}, all conv stages)")
    for entry in (small, large):
        print(f"    {entry['images']:6d} images: peak {entry['peak_kb'] / 1024:7.1f} MB "
              f"(after loading the model {entry['before_kb'] / 1024:7.1f} MB), {entry['images'] / entry['seconds']:.0f} img/s")
    print(f"    ratio 60k/10k: {large['peak_kb'] / small['peak_kb']:.3f} (target within 1.10)")


def distributed(model_name: str, batch_size: int) -> None:
    from convscope.models.registry import get_spec

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["patches", "fashion-mnist:test", "--model", model_name, "--weights", "random", "--no-projections",
            "-b", str(batch_size), "--device", "cpu", "--channels", "0-7"]
    for stage in get_spec(model_name).stages:
        args += ["--layer", stage]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            command = [sys.executable, "-m", "convscope", *args, "-o", f"{tmp}/p{procs}"]
            if procs > 1:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(procs), "-m", "convscope", *args, "-o", f"{tmp}/p{procs}"]
            start = time.perf_counter()
            run = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            mined = re.search(r"mined (\d+) images in ([\d.]+) s", run.stdout)
            assert mined is not None, run.stdout
            rows.append((procs, wall, float(mined.group(2)), int(mined.group(1))))
        same = Path(f"{tmp}/p1/patches.json").read_bytes() == Path(f"{tmp}/p2/patches.json").read_bytes()
    print(f"[3] CLI, fashion-mnist:test, {model_name}, every conv stage, channels 0-7, --no-projections, batch {batch_size}")
    for procs, wall, mining, count in rows:
        print(f"    {procs} process{'es' if procs > 1 else '  '}: mining {mining:6.1f} s ({count / mining:5.0f} img/s), "
              f"whole command {wall:6.1f} s")
    print(f"    2 vs 1: mining {rows[0][2] / rows[1][2]:.2f}x faster, whole command {rows[0][1] / rows[1][1]:.2f}x; "
          f"patches.json identical: {same}")


# A plain script a user would write: the same model and preprocessing through the library,
# every photo decoded and preprocessed, forward only, in batches of the command's default size.
PLAIN_SCRIPT = """
import sys, torch, convscope
from convscope.imageio import iter_images
loaded = convscope.load_model("efficientnet_lite0")
paths = iter_images([sys.argv[1]])
with torch.no_grad():
    for start in range(0, len(paths), int(sys.argv[2])):
        chunk = paths[start:start + int(sys.argv[2])]
        loaded.module(loaded.preprocess.to_tensor([loaded.preprocess.load_image(p) for p in chunk]))
print(len(paths))
"""


def command_photos(count: int, repeats: int, batch_size: int) -> None:
    from cpu_fast_path import make_photo_folder  # bench/cpu_fast_path.py: the real photos of the CPU bench

    folder = Path(tempfile.gettempdir()) / f"convscope-bench-photos-{count}"
    make_photo_folder(folder, count)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times: dict[str, list[float]] = {"convscope patches": [], "plain script": []}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(repeats):
            commands = {
                "convscope patches": [sys.executable, "-m", "convscope", "patches", str(folder),
                                      "--model", "efficientnet_lite0", "--layer", "stage6", "--no-projections",
                                      "-b", str(batch_size), "-o", f"{tmp}/out{attempt}"],
                "plain script": [sys.executable, "-c", PLAIN_SCRIPT, str(folder), str(batch_size)],
            }
            # The order flips each attempt, so a busy spell does not always fall on the same side.
            for name, command in sorted(commands.items(), reverse=attempt % 2 == 1):
                start = time.perf_counter()
                run = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                times[name].append(time.perf_counter() - start)
                if name == "plain script":
                    assert int(run.stdout.strip()) == count, run.stdout
                else:
                    assert f"mined {count} images" in run.stdout, run.stdout
    ours, plain = min(times["convscope patches"]), min(times["plain script"])
    print(f"[4] whole process: convscope patches ({count} photos, efficientnet_lite0 stage6, --no-projections, "
          f"batch {batch_size}) against a plain forward-only script, best of {repeats} alternating runs")
    for name, values in times.items():
        print(f"    {name:17s}: best {min(values):6.2f} s  {count / min(values):6.1f} img/s  "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"    ratio {plain / ours:.2f}x of the plain script's speed (target >= 0.9x)")
    row("patches command efficientnet_lite0 stage6", "plain forward-only script", plain / ours, 0.9,
        unit="x of the script's speed", detail=f"{count} photos, --no-projections, whole process, batch {batch_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zfnet_mnist")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-model", help="model of parts 2 and 3 (default: --model); tiny keeps them short")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-dist", action="store_true")
    parser.add_argument("--command-photos", type=int, metavar="N",
                        help="part 4: the whole patches command on N photos against a plain script (issue 22: 256)")
    parser.add_argument("--command-repeats", type=int, default=3)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.model, args.batch_size)
        return
    other = args.rss_model or args.model
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if not args.skip_throughput:
        throughput(args.model, args.images, args.batch_size, args.repeats)
    if not args.skip_rss:
        rss(other, args.batch_size)
    if not args.skip_dist:
        distributed(other, args.batch_size)
    if args.command_photos:
        command_photos(args.command_photos, args.command_repeats, 64)  # 64: the command's default batch
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())


if __name__ == "__main__":
    main()
