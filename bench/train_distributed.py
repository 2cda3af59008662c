"""Training images/s: one process against ``torchrun --nproc-per-node 2`` on the same global batch.

Every configuration is a real ``convscope train`` run in its own process (one Fashion-MNIST epoch,
``--val-split 0``), read back from its ``result.json`` (``images_per_second``: the training steps
only, so data loading, evaluation and checkpoints do not count; and the whole process's wall time):

* ``1 process``           the default: one process, PyTorch's default thread count (the cores);
* ``1 process, 1 thread`` ``OMP_NUM_THREADS=1``, i.e. what each torchrun worker gets;
* ``2 processes``         ``torchrun --nproc-per-node 2`` (gloo, one thread each; torchrun's default).

Runs alternate and the best of ``--repeats`` is kept, so background load hits all alike; the
machine's load average is printed before and after. Ratios are against the default one process.

Usage:
    .venv/bin/python bench/train_distributed.py [--arch zfnet_mnist] [--batch-size 128] [--images 4096]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(kind: str, folder: Path, train_args: list[str]) -> tuple[float, float]:
    env = dict(os.environ)
    if kind == "2 processes":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", str(_free_port()), "-m", "convscope", "train"]
    else:
        command = [sys.executable, "-m", "convscope", "train"]
        if kind == "1 process, 1 thread":
            env["OMP_NUM_THREADS"] = "1"
        else:
            env.pop("OMP_NUM_THREADS", None)
    started = time.perf_counter()
    subprocess.run([*command, *train_args, "-o", str(folder)], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    result = json.loads((folder / "result.json").read_text())
    return float(result["final"]["images_per_second"]), wall


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="zfnet_mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    train_args = ["--data", "fashion-mnist", "--arch", args.arch, "-b", str(args.batch_size), "--epochs", "1",
                  "--val-split", "0", "--limit", str(args.images)]
    kinds = ("1 process", "1 process, 1 thread", "2 processes")
    best: dict[str, tuple[float, float]] = {}
    print(f"cores: {os.cpu_count()}; load average (1, 5, 15 min) before: {_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for kind in kinds:
                speed, wall = _run(kind, Path(tmp) / f"{kind.replace(' ', '_').replace(',', '')}_{repeat}", train_args)
                if kind not in best or speed > best[kind][0]:
                    best[kind] = (speed, wall)
    print(f"load average after: {_load()}")
    base = best["1 process"][0]
    print(f"{args.arch}, global batch {args.batch_size}, {args.images} training images, best of {args.repeats}")
    print(f"{'configuration':<22}{'train img/s':>12}{'ratio':>8}{'wall s':>9}")
    for kind in kinds:
        speed, wall = best[kind]
        print(f"{kind:<22}{speed:>12.0f}{speed / base:>8.2f}{wall:>9.1f}")


if __name__ == "__main__":
    main()
