"""Start-up time of the light commands against ``python -c "import torch"`` in the same run.

    PYTHONPATH=$PWD python bench/startup.py [--repeat 5] [--source DIR ...]

Each command runs ``--repeat`` times as a fresh process (best and median wall time reported);
``--source`` adds a checkout to compare (e.g. the main branch before the lazy registry), run with
that checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "convscope models": ["-m", "convscope", "models"],
    "convscope layers --model tiny": ["-m", "convscope", "layers", "--model", "tiny"],
    "convscope layers --model alexnet": ["-m", "convscope", "layers", "--model", "alexnet"],
}


def timed(args: list[str], source: Path, repeat: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", type=Path, action="append", default=[])
    options = parser.parse_args()
    sources = [Path(__file__).resolve().parent.parent, *options.source]
    rows = []
    for source in sources:
        for name, args in COMMANDS.items():
            if name == "import torch" and source != sources[0]:
                continue
            times = timed(args, source, options.repeat)
            rows.append((source.name, name, min(times), statistics.median(times)))
    torch_best = next(r[2] for r in rows if r[1] == "import torch")
    torch_median = next(r[3] for r in rows if r[1] == "import torch")
    print(f"{'source':<12} {'command':<34} {'best s':>7} {'median s':>9} {'best/torch':>11} {'median/torch':>13}")
    for source, name, best, median in rows:
        print(f"{source:<12} {name:<34} {best:7.2f} {median:9.2f} {best / torch_best:10.2f}x {median / torch_median:12.2f}x")


if __name__ == "__main__":
    main()
