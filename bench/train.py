"""Training throughput: convscope's loop vs a plain hand-written PyTorch loop, same model and batch.

Both train the same freshly seeded network on the same Fashion-MNIST images with AdamW. The plain
loop keeps the normalised images in one float tensor and does only forward, loss, backward, step.
convscope's loop (``convscope.training.train``) additionally converts uint8 batches, sets the
learning rate per step, tracks loss/accuracy, and (outside the timed training phase) evaluates
on the test split and writes atomic checkpoints; its ``images_per_second`` covers the
training steps, and the "wall" column divides the images by the whole epoch (evaluation and
checkpoints included).

Runs alternate (ours, plain, ours, plain...) and the best of ``--repeats`` is kept for each,
so background load hits both alike. Target: ours / plain >= 0.95.

Usage:
    .venv/bin/python bench/train.py [--arch zfnet_mnist] [--batch-size 256] [--images 8192]
        [--precision fp32|bf16] [--channels-last] [--repeats 3]

Tip: the glibc allocator returns big activation buffers to the OS after each step and faults them
back in on the next; ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` keeps
them (applies to both loops alike).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F


def plain_loop(arch: str, images: torch.Tensor, labels: torch.Tensor, batch: int, precision: str,
               channels_last: bool, seed: int) -> float:
    """A hand-written loop: images/s over one epoch."""
    from convscope.models.registry import get_spec

    spec = get_spec(arch)
    torch.manual_seed(seed)
    model = spec.build(10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    mean, std = spec.preprocess.mean[0], spec.preprocess.std[0]
    data = (images.float() / 255.0 - mean) / std
    if channels_last:
        data = data.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    model.train()
    steps = len(labels) // batch
    order = torch.randperm(len(labels))
    start = time.perf_counter()
    for step in range(steps):
        index = order[step * batch : (step + 1) * batch]
        x, y = data[index], labels[index]
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def our_loop(arch: str, count: int, batch: int, precision: str, channels_last: bool, seed: int) -> tuple[float, float]:
    """convscope.training.train for one epoch: (training-phase images/s, whole-epoch images/s)."""
    from convscope.training import TrainConfig, train

    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        result = train(TrainConfig(
            data="fashion-mnist", arch=arch, out_dir=str(folder / "run"), epochs=1, batch_size=batch, limit=count,
            precision=precision, channels_last=channels_last, seed=seed, schedule="constant",
        ))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    metrics = result.history[-1]
    images = (count // batch) * batch
    return float(metrics["images_per_second"]), images / float(metrics["epoch_seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="zfnet_mnist")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8192, help="training images per epoch")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from convscope.models.registry import get_spec
    from convscope.training.data import fashion_mnist_available, load_training_data

    if not fashion_mnist_available():
        print("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    data = load_training_data("fashion-mnist", preprocess=get_spec(args.arch).preprocess, limit=args.images)
    images, labels = data.train.images, data.train.labels

    # Warm-up (oneDNN primitive creation, allocator) for both, untimed.
    plain_loop(args.arch, images[: 4 * args.batch_size], labels[: 4 * args.batch_size], args.batch_size,
               args.precision, args.channels_last, 0)
    ours_steps, ours_wall, plain = [], [], []
    for repeat in range(args.repeats):
        steps_rate, wall_rate = our_loop(args.arch, args.images, args.batch_size, args.precision, args.channels_last, repeat)
        ours_steps.append(steps_rate)
        ours_wall.append(wall_rate)
        plain.append(plain_loop(args.arch, images, labels, args.batch_size, args.precision, args.channels_last, repeat))
        print(f"  repeat {repeat + 1}: ours {steps_rate:7.0f} img/s (wall {wall_rate:7.0f})   plain {plain[-1]:7.0f} img/s",
              flush=True)
    best_plain = max(plain)
    print(f"\n{args.arch}, batch {args.batch_size}, {args.precision}{', channels-last' if args.channels_last else ''}, "
          f"{args.images} images, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  plain PyTorch loop       {best_plain:8.0f} img/s   1.00x")
    print(f"  convscope train (steps)  {max(ours_steps):8.0f} img/s   {max(ours_steps) / best_plain:.2f}x   (target >= 0.95x)")
    print(f"  convscope train (wall)   {max(ours_wall):8.0f} img/s   {max(ours_wall) / best_plain:.2f}x   "
          f"(whole epoch: + evaluating {args.images} test images + checkpoints)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
