#!/usr/bin/env bash
# Record what a fixed set of CLI runs print and write, to prove a refactor changed nothing.
#
# Usage (from the repository root):
#
#     tools/compare_outputs.sh before        # before editing: writes /tmp/before/
#     tools/compare_outputs.sh after         # after: writes /tmp/after/
#     tools/compare_outputs.sh --compare before after   # diff the two digests; exit 1 on a difference
#     tools/compare_outputs.sh --redigest before        # recompute the digests of an existing run
#
# SRC=/some/tree runs the commands against another copy of the source (PYTHONPATH=SRC, from SRC,
# with this checkout's virtualenv), e.g. an untouched ``git archive HEAD`` export, so that other
# work in progress in the shared tree does not leak into the comparison.
#
# Each case gets /tmp/<label>/<case>/ with stdout, stderr, rc, the files the command wrote (out/)
# and digest.txt: one line per output (stdout, stderr, rc, every written file) with its sha256.
# Fields that hold clock times are dropped before hashing, and named in digest.txt: in JSON
# files and JSON stdout the keys listed in TIME_KEYS (the manifest's per-run "started" and
# "finished"), in stderr the lines of progress bars and "took N s" style timings. A written
# JSON file is hashed as canonical JSON without those keys (its raw sha256 goes to raw_sha256.txt,
# for information, and is not compared). The absolute output directory differs between labels, so it is replaced by
# <OUT> in every text before hashing.
set -u

BIN=${BIN:-$(pwd)/.venv/bin}
SRC=${SRC:-$(pwd)}
IMAGE=${IMAGE:-convscope/data/chelsea.jpg}
TIME_KEYS=${TIME_KEYS:-started,finished,seconds,elapsed,elapsed_seconds,duration}

if [ "${1:-}" = "--compare" ]; then
    a=${2:?usage: $0 --compare LABEL_A LABEL_B}
    b=${3:?usage: $0 --compare LABEL_A LABEL_B}
    status=0
    for digest in /tmp/"$a"/*/digest.txt; do
        case_name=$(basename "$(dirname "$digest")")
        other=/tmp/$b/$case_name/digest.txt
        if [ ! -f "$other" ]; then
            echo "$case_name: missing in $b"; status=1; continue
        fi
        if diff -u "$digest" "$other" >/tmp/compare_outputs.diff; then
            echo "$case_name: identical"
        else
            echo "$case_name: DIFFERENT"; cat /tmp/compare_outputs.diff; status=1
        fi
    done
    exit $status
fi

# The digest of one case: strip clock times and the label's own path, hash what is left.
digest() {
    local dir=$1
    "$BIN/python" - "$dir" "$TIME_KEYS" <<'PY'
import hashlib, json, re, sys
from pathlib import Path

case, keys = Path(sys.argv[1]), set(sys.argv[2].split(","))
out = case / "out"
raw_lines = [f"# {case.name}: sha256 of the JSON files as written (clock times included; not compared)"]
lines = [f"# {case.name}", f"# clock-time fields dropped before hashing: {sorted(keys)}; progress/timing lines of stderr"]

def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value

def text(data: bytes) -> bytes:
    return data.replace(str(out).encode(), b"<OUT>")

def canonical(data: bytes) -> tuple[bytes, bool]:
    try:
        value = json.loads(text(data))
    except (ValueError, UnicodeDecodeError):
        return text(data), False
    return json.dumps(strip(value), sort_keys=True).encode(), True

for name in ("stdout", "stderr", "rc"):
    data = (case / name).read_bytes()
    if name == "stderr":
        kept = [l for l in text(data).decode(errors="replace").splitlines()
                if not re.search(r"\d+(\.\d+)?\s*(s|ms|sec|seconds)\b|it/s|s/it|\d+%\|", l)]
        data = "\n".join(kept).encode()
    elif name == "stdout":
        data = canonical(data)[0]
    lines.append(f"{name} {hashlib.sha256(data).hexdigest()}")
for path in sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []:
    raw = path.read_bytes()
    rel = path.relative_to(out)
    if path.suffix == ".json":
        data, ok = canonical(raw)
        lines.append(f"file {rel} {hashlib.sha256(data).hexdigest()}" + ("" if ok else " (not JSON)"))
        raw_lines.append(f"file {rel} {hashlib.sha256(raw).hexdigest()}")
    else:
        lines.append(f"file {rel} {hashlib.sha256(raw).hexdigest()}")
(case / "digest.txt").write_text("\n".join(lines) + "\n")
(case / "raw_sha256.txt").write_text("\n".join(raw_lines) + "\n")
PY
}

if [ "${1:-}" = "--redigest" ]; then  # recompute the digests of an existing run
    for dir in /tmp/"${2:?usage: $0 --redigest LABEL}"/*/; do digest "${dir%/}"; done
    exit 0
fi

label=${1:?usage: $0 LABEL | --compare LABEL_A LABEL_B | --redigest LABEL}
cd "$SRC" || exit 2
export PYTHONPATH=$SRC
root=/tmp/$label
rm -rf "$root"
mkdir -p "$root"

# run CASE COMMAND...: the command may name the case's output directory as @OUT.
run() {
    local name=$1; shift
    local dir=$root/$name
    mkdir -p "$dir"
    local args=()
    for arg in "$@"; do args+=("${arg//@OUT/$dir/out}"); done
    "${args[@]}" >"$dir/stdout" 2>"$dir/stderr"
    echo $? >"$dir/rc"
    digest "$dir"
    echo "$name: rc $(cat "$dir/rc")"
}

TINY=(-m tiny -w random --window 8 --stride 4)
run occ_tiny "$BIN/convscope" occlusion "$IMAGE" "${TINY[@]}" -o @OUT --json
run occ_tiny_layer "$BIN/convscope" occlusion "$IMAGE" "${TINY[@]}" --layer features.3 -o @OUT --json
run occ_tiny_layer_relu "$BIN/convscope" occlusion "$IMAGE" "${TINY[@]}" --layer conv1 -o @OUT --json
run occ_tiny_approximate "$BIN/convscope" occlusion "$IMAGE" "${TINY[@]}" --mode approximate -o @OUT --json
run occ_tiny_full "$BIN/convscope" occlusion "$IMAGE" "${TINY[@]}" --mode full -o @OUT --json
run occ_default "$BIN/convscope" occlusion "$IMAGE" --window 32 --stride 16 -o @OUT --json
run summary_alexnet "$BIN/convscope" summary -m alexnet --json
run summary_efficientnet_lite0 "$BIN/convscope" summary -m efficientnet_lite0 --json
run layers_resnet18 "$BIN/convscope" layers -m resnet18
run layers_tiny "$BIN/convscope" layers -m tiny --json
# The library's result itself, every tensor hashed bitwise (the PNGs above quantise the maps).
run occ_library "$BIN/python" -c '
import hashlib, torch, convscope
from dataclasses import fields
def digest(value):
    if isinstance(value, torch.Tensor):
        return value.dtype, tuple(value.shape), hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()[:20]
    return value
cases = [("tiny", 32, 8, 4, "features.3"), ("alexnet", 96, 16, 8, "features.3"), ("resnet18", 64, 16, 8, "layer1.0.conv1"),
         ("efficientnet_lite0", 64, 16, 8, "stage2"), ("zfnet", 96, 16, 8, None), ("vgg16", 48, 16, 8, "features.2")]
for name, size, window, stride, layer in cases:
    model = convscope.load_model(name, weights="random")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"layer": layer} if layer else {}, {"cover_border": True, "fill": "grey"}, {"mode": "full"}):
        result = convscope.occlusion(model, x, window=window, stride=stride, **kwargs)
        print(name, kwargs, {f.name: digest(getattr(result, f.name)) for f in fields(result)})
'
