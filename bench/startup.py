"""Start-up time of the light commands against ``python -c "import torch"`` in the same run.

    PYTHONPATH=$PWD python bench/startup.py [--repeat 5] [--source DIR ...]

Each command runs ``--repeat`` times as a fresh process, round-robin (median wall and CPU time);
``--source`` adds a folder holding another ``convscope`` package to compare (e.g. ``git archive``
of the commit before the lazy registry), run from that folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _row import row  # bench/_row.py: the BENCH-ROW line of bench/table.py

# Commands that never need torch: issue 22's target is <= 0.5x `import torch` for these.
LIGHT = ("convscope models", "convscope --help", "convscope layers --help")
COMMANDS = {
    "import torch": ["-c", "import torch"],
    "convscope models": ["-m", "convscope", "models"],
    "convscope --help": ["-m", "convscope", "--help"],
    "convscope layers --help": ["-m", "convscope", "layers", "--help"],
    "convscope layers --model tiny": ["-m", "convscope", "layers", "--model", "tiny"],
    "convscope layers --model alexnet": ["-m", "convscope", "layers", "--model", "alexnet"],
}


def run_once(args: list[str], source: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # cwd too: `python -m` puts the working directory before PYTHONPATH on sys.path.
    subprocess.run([sys.executable, *args], env=env, cwd=source, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", type=Path, action="append", default=[])
    options = parser.parse_args()
    sources = [Path(__file__).resolve().parent.parent, *options.source]
    jobs = [(sources[0], "import torch", COMMANDS["import torch"])]
    jobs += [(source, name, args) for source in sources for name, args in COMMANDS.items() if name != "import torch"]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    # Round-robin, so a burst of load from other processes hits every command alike.
    for _ in range(options.repeat):
        for source, name, args in jobs:
            results.setdefault((source.name, name), []).append(run_once(args, source))
    torch_wall = statistics.median(w for w, _ in results[(sources[0].name, "import torch")])
    torch_cpu = statistics.median(c for _, c in results[(sources[0].name, "import torch")])
    print(f"{'source':<12} {'command':<34} {'wall s':>7} {'cpu s':>6} {'wall/torch':>11} {'cpu/torch':>10}  (medians)")
    for (source, name), runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{source:<12} {name:<34} {wall:7.2f} {cpu:6.2f} {wall / torch_wall:10.2f}x {cpu / torch_cpu:9.2f}x")
        if source == sources[0].name and name in LIGHT:
            row(f"start-up: {name}", "python -c 'import torch'", wall / torch_wall, 0.5, better="lower",
                unit="x the time", detail=f"median of {options.repeat}, whole process")


if __name__ == "__main__":
    main()
