"""Record what the CLI does for the README's commands, and compare two recordings.

A refactor that promises "behaviour stays the same" is checked with this: record with the old code,
record with the new, compare. Each command runs in a fresh folder under the recording; the record
holds its exit code, stdout, stderr and, for every file written, its SHA-256 (JSON files: their
parsed content with timing and process fields masked, so two runs of the same code compare equal).

    python tools/record_behaviour.py record before            # the code on PYTHONPATH / installed
    PYTHONPATH=/tmp/base python tools/record_behaviour.py record before   # an older checkout
    python tools/record_behaviour.py compare before after

Recordings live in /tmp/convscope-behaviour/<label>/ (nothing is written into the repo).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path("/tmp/convscope-behaviour")
REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "convscope" / "data" / "chelsea.jpg"
COFFEE = REPO / "convscope" / "data" / "coffee.jpg"
TINY = ["-m", "tiny", "-w", "random"]
# Fields whose values differ between two runs of the same code.
MASKED = {"started", "finished", "elapsed", "elapsed_seconds", "seconds", "pid", "timings", "time", "duration",
          "images_per_second", "running", "throughput", "wall_seconds", "load_seconds"}
_TIMING_TEXT = re.compile(r"\d+(\.\d+)?\s?(ms|s|img/s)\b")

COMMANDS: dict[str, list[str]] = {
    "models": ["models"],
    "models_json": ["models", "--json"],
    "classify": ["classify", str(PHOTO), str(COFFEE), "--topk", "3", *TINY],
    "classify_json": ["classify", str(PHOTO), "--topk", "3", "--json", *TINY],
    "classify_default": ["classify", str(PHOTO)],
    "summary_alexnet": ["summary", "--model", "alexnet"],
    "summary_tiny_json": ["summary", *TINY, "--json"],
    "layers_vgg16": ["layers", "--model", "vgg16"],
    "activations": ["activations", str(PHOTO), *TINY, "-o", "{out}"],
    "features": ["features", str(PHOTO), *TINY, "--layer", "conv2", "--max", "8", "--order", "activation", "-o", "{out}"],
    "filters": ["filters", *TINY, "-o", "{out}"],
    "filters_conv2": ["filters", *TINY, "--layer", "conv2", "-o", "{out}"],
    "explain": ["explain", str(PHOTO), *TINY, "-o", "{out}"],
    "gradcam": ["gradcam", str(PHOTO), *TINY, "-o", "{out}"],
    "gradcampp": ["gradcam", str(PHOTO), *TINY, "--class", "3", "--variant", "gradcam++", "-o", "{out}"],
    "gradcam_guided": ["gradcam", str(PHOTO), *TINY, "--variant", "guided", "-o", "{out}"],
    "scorecam": ["gradcam", str(PHOTO), *TINY, "--variant", "scorecam", "-o", "{out}"],
    "gradcam_raw": ["gradcam", str(PHOTO), str(COFFEE), *TINY, "--raw", "-o", "{out}"],
    "guided": ["guided", str(PHOTO), *TINY, "-o", "{out}"],
    "saliency": ["saliency", str(PHOTO), *TINY, "-o", "{out}"],
    "deconv": ["deconv", str(PHOTO), *TINY, "--layer", "conv2", "--top", "4", "-o", "{out}"],
    "occlusion": ["occlusion", str(PHOTO), *TINY, "--window", "8", "--stride", "4", "-o", "{out}"],
    "occlusion_layer": ["occlusion", str(PHOTO), *TINY, "--window", "8", "--stride", "4", "--layer", "conv2",
                        "-o", "{out}"],
    "occlusion_default": ["occlusion", str(PHOTO), "--window", "32", "--stride", "16", "-o", "{out}"],
    "occlusion_approximate": ["occlusion", str(PHOTO), *TINY, "--window", "8", "--stride", "4", "--mode", "approximate",
                              "-o", "{out}"],
    "summary_alexnet_json": ["summary", "--model", "alexnet", "--json"],
    "summary_lite0_json": ["summary", "--json"],
    "layers_resnet18": ["layers", "--model", "resnet18"],
    "explore": ["explore", str(PHOTO), *TINY, "-o", "{out}/report.html"],
    "patches": ["patches", str(REPO / "convscope" / "data"), *TINY, "--layer", "conv2", "--channels", "0-3",
                "-o", "{out}"],
    "invariance": ["invariance", str(PHOTO), *TINY, "--transform", "rotate", "-o", "{out}"],
    "quality": ["quality", str(PHOTO), *TINY, "--methods", "gradcam,saliency", "-o", "{out}"],
    "train": ["train", "--data", "digits", "--arch", "tiny", "--epochs", "1", "--limit", "64", "-o", "{out}/run"],
    "demo": ["demo", "-o", "{out}"],
    "bad_image": ["gradcam", str(REPO / "README.md"), *TINY, "-o", "{out}"],
    # --raw (the bare pictures) and --json (records on stdout, in key order) of every method command
    "activations_raw": ["activations", str(PHOTO), *TINY, "--raw", "-o", "{out}"],
    "features_raw": ["features", str(PHOTO), *TINY, "--max", "8", "--raw", "-o", "{out}"],
    "filters_raw": ["filters", *TINY, "--layer", "conv2", "--raw", "-o", "{out}"],
    "gradcam_guided_raw": ["gradcam", str(PHOTO), *TINY, "--variant", "guided", "--raw", "--json", "-o", "{out}"],
    "guided_raw": ["guided", str(PHOTO), *TINY, "--raw", "--json", "-o", "{out}"],
    "saliency_raw": ["saliency", str(PHOTO), *TINY, "--raw", "-o", "{out}"],
    "deconv_raw": ["deconv", str(PHOTO), *TINY, "--layer", "conv2", "--top", "3", "--raw", "--json", "-o", "{out}"],
    "occlusion_raw": ["occlusion", str(PHOTO), *TINY, "--window", "8", "--stride", "4", "--layer", "conv2", "--raw",
                      "--json", "-o", "{out}"],
    "scorecam_json": ["gradcam", str(PHOTO), str(COFFEE), *TINY, "--variant", "scorecam", "--json", "-o", "{out}"],
    "classify_bad": ["classify", str(PHOTO), str(REPO / "README.md"), *TINY, "--json"],
}


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<masked>" if k in MASKED else _mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def _file_record(path: Path) -> Any:
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl"):
        try:
            lines = data.decode().splitlines() if path.suffix == ".jsonl" else [data.decode()]
            return [_mask(json.loads(line)) for line in lines if line.strip()]
        except ValueError:
            pass
    if path.suffix in (".pt", ".html", ".txt", ".md"):
        # Checkpoints hold timings; the report and tables print them: compare the text without numbers+units.
        if path.suffix == ".pt":
            return f"<{len(data) // 1024} KiB checkpoint>"
        return hashlib.sha256(_TIMING_TEXT.sub("<t>", data.decode("utf-8", "replace")).encode()).hexdigest()
    return hashlib.sha256(data).hexdigest()


def record(label: str, only: list[str]) -> None:
    base = ROOT / label
    if base.exists() and not only:
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COLUMNS": "100", "CONVSCOPE_NO_PROGRESS": "1"}
    for name, args in COMMANDS.items():
        if only and name not in only:
            continue
        out = Path("/tmp/convscope-behaviour-out") / name  # the same path in every recording
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        argv = [a.replace("{out}", str(out)) for a in args]
        done = subprocess.run([sys.executable, "-m", "convscope", *argv], capture_output=True, text=True, env=env,
                              cwd=str(out), check=False)
        files = {str(p.relative_to(out)): _file_record(p) for p in sorted(out.rglob("*")) if p.is_file()}
        entry = {"argv": argv, "exit": done.returncode, "stdout": _TIMING_TEXT.sub("<t>", done.stdout),
                 "stderr": _TIMING_TEXT.sub("<t>", done.stderr), "files": files}
        (base / f"{name}.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
        print(f"{name}: exit {done.returncode}, {len(files)} files", flush=True)


def compare(first: str, second: str) -> int:
    differences = 0
    for path in sorted((ROOT / first).glob("*.json")):
        other = ROOT / second / path.name
        if not other.exists():
            print(f"{path.stem}: missing in {second}")
            differences += 1
            continue
        a, b = json.loads(path.read_text()), json.loads(other.read_text())
        for key in ("exit", "stdout", "stderr"):
            if a[key] != b[key]:
                differences += 1
                print(f"{path.stem}: {key} differs:\n  {first}: {a[key]!r:.600}\n  {second}: {b[key]!r:.600}")
        for name in sorted(set(a["files"]) | set(b["files"])):
            if a["files"].get(name) != b["files"].get(name):
                differences += 1
                print(f"{path.stem}: file {name} differs ({'missing' if name not in b['files'] else 'content'})")
    print(f"{differences} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
