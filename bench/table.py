"""Every speed ratio against its peer in one table (``make bench``).

Runs each bench script in its own process (each sets up its own threads and allocator), with
settings short enough for the whole table to take under 15 minutes on a 2-core machine, and
collects the ``BENCH-ROW`` lines they print (``bench/_row.py``). Every ratio is measured against
its peer in the same run of the same script, so load from other processes hits both sides;
the machine's load average is printed before and after each script.

    .venv/bin/python bench/table.py                     # the table
    .venv/bin/python bench/table.py --only lrp,ig       # some scripts
    .venv/bin/python bench/table.py --readme README.md  # also rewrite the README's table

The README's table sits between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``
and is replaced as a whole, with the date and the load of the run. A script that fails or is
missing (a peer not installed, no Fashion-MNIST) is listed with its last error line; the
others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "BENCH-ROW "
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

# name -> (script, arguments): short settings; each script's docstring has the long ones.
JOBS: dict[str, tuple[str, list[str]]] = {
    "startup": ("startup.py", ["--repeat", "3"]),
    "classify": ("cpu_fast_path.py", ["classify", "--images", "512", "--repeats", "2"]),
    "gradients": ("gradients.py", ["--models", "efficientnet_lite0,vgg16", "--repeats", "3"]),
    "scorecam": ("scorecam.py", ["--layers", "stage5,stage6,head"]),
    "occlusion": ("occlusion.py", ["--models", "alexnet,efficientnet_lite0", "--repeats", "1", "--ppe", "32,64",
                                   "--keep-env"]),
    "mining": ("patches.py", ["--images", "4096", "--repeats", "2", "--skip-rss", "--skip-dist"]),
    "patches-command": ("patches.py", ["--skip-throughput", "--skip-rss", "--skip-dist", "--command-photos", "256",
                                       "--command-repeats", "3"]),
    "lrp": ("lrp.py", ["--cases", "vgg16,efficientnet_lite0", "--repeats", "2"]),
    "ig": ("ig.py", ["--models", "efficientnet_lite0", "--repeats", "2", "--fresh", "--peer-batches", "10,50"]),
    "pixelflipping": ("pixelflipping.py", ["--setting", "all", "--repeats", "1"]),
    "featurevis": ("featurevis.py", ["--steps", "128", "--units", "32", "--peer-units", "8"]),
}


def load() -> str:
    """The 1-minute load average (other jobs on the cores move absolute times, not ratios)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def run(name: str, script: str, args: list[str], log: Path) -> tuple[list[dict], str, float]:
    """Run one script; its rows, an error line (empty when it succeeded) and its seconds."""
    path = HERE / script
    if not path.exists():
        return [], f"{script} is missing", 0.0
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n===== {name}: {script} {' '.join(args)} (exit {done.returncode}, {seconds:.0f} s)\n")
        handle.write(done.stdout)
        handle.write(done.stderr)
    rows = [json.loads(line[len(PREFIX):]) for line in done.stdout.splitlines() if line.startswith(PREFIX)]
    error = ""
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit {done.returncode}"
    return rows, error, seconds


def met(row: dict) -> bool:
    value, target = float(row["value"]), float(row["target"])
    return value >= target if row["better"] == "higher" else value <= target


def markdown(rows: list[tuple[str, dict]], failures: list[tuple[str, str]], header: str) -> str:
    lines = [header, "", "| method | peer (same run) | ratio | target | met | settings |", "|---|---|---|---|---|---|"]
    for _, row in rows:
        sign = ">=" if row["better"] == "higher" else "<="
        lines.append(f"| {row['method']} | {row['peer']} | {row['value']:.2f} {row['unit']} | {sign} {row['target']:g} "
                     f"| {'yes' if met(row) else '**no**'} | {row['detail']} |")
    for name, error in failures:
        lines.append(f"| {name} | - | not measured | - | - | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated job names: " + ", ".join(JOBS))
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "convscope-bench.log")
    parser.add_argument("--readme", type=Path, help="rewrite this README's table between the markers")
    options = parser.parse_args()
    names = options.only.split(",") if options.only else list(JOBS)
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        parser.error(f"unknown job {unknown[0]}: choose from {', '.join(JOBS)}")
    options.log.write_text("", encoding="utf-8")
    rows: list[tuple[str, dict]] = []
    failures: list[tuple[str, str]] = []
    loads = [load()]
    total = time.perf_counter()
    for name in names:
        script, args = JOBS[name]
        print(f"{name}: {script} {' '.join(args)} (load {load()})", flush=True)
        found, error, seconds = run(name, script, args, options.log)
        loads.append(load())
        print(f"  {len(found)} rows, {seconds:.0f} s{'; failed: ' + error if error else ''}", flush=True)
        rows += [(name, row) for row in found]
        if error or not found:
            failures.append((name, error or "no rows printed"))
    import torch  # only for the header line, after the scripts (they time their own imports)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    header = (f"Measured {stamp} with `make bench` ({time.perf_counter() - total:.0f} s): {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, load average {min(loads)}-{max(loads)} during the run. Ratios are against "
              "the peer in the same run of the same script; the full output is in the log.")
    table = markdown(rows, failures, header)
    print()
    print(table)
    print(f"full output: {options.log}")
    if options.readme:
        text = options.readme.read_text(encoding="utf-8")
        if START not in text or END not in text:
            sys.exit(f"error: {options.readme}: no {START} ... {END} markers")
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        options.readme.write_text(f"{before}{START}\n{table}{END}{after}", encoding="utf-8")
        print(f"rewrote the table in {options.readme}")


if __name__ == "__main__":
    main()
