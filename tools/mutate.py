"""Run mutmut on one core numeric module with the tests that exercise it.

Usage (from the repository root; ``make mutate MODULE=predict`` wraps it)::

    python tools/mutate.py predict [--jobs 2] [--full] [--tests a.py,b.py::test_x] [--diffs] [MUTANT_GLOB ...]

Without mutant globs a module runs its quick sample (``QUICK_GLOBS``; the whole module where it
is cheap), with ``--full`` every mutant (``FULL_GLOBS``). ``--diffs`` prints the change of every
survivor (``mutmut show``) after the counts.

mutmut 3 reads one ``[tool.mutmut]`` section; this script starts from it and narrows
``only_mutate`` and the test selection to the chosen module, so the stats pass runs a few
test files instead of six. ``mutants/`` is rebuilt for each module (its cached stats belong
to one test selection). Prints the killed/survived/timeout counts at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

# One fast occlusion test that also reaches preprocess (a one-channel model) and geometry (the
# chain's reach): the rest of tests/test_occlusion.py would cost minutes per stats pass.
_CHAIN_TEST = "tests/test_occlusion.py::test_incremental_chain_stops_at_the_recompute_fraction"

MODULES: dict[str, tuple[str, list[str]]] = {
    "predict": (
        "convscope/methods/predict.py",
        ["tests/test_predict.py", "tests/test_models_load.py::test_classify_equals_a_plain_torchvision_loop"],
    ),
    "preprocess": (
        "convscope/preprocess.py",
        ["tests/test_preprocess.py", "tests/test_predict.py", _CHAIN_TEST, "tests/test_models_load.py",
         "tests/test_validation.py", "tests/test_memory.py"],
    ),
    "geometry": (
        "convscope/probes/geometry.py",
        ["tests/test_geometry_contract.py", "tests/test_geometry.py", _CHAIN_TEST],
    ),
    "relu_rules": (
        "convscope/probes/relu_rules.py",
        ["tests/test_relu_rules_calls.py", "tests/test_gradients.py", "tests/test_peers_gradients.py"],
    ),
    "gradcam": (
        "convscope/methods/gradcam.py",
        ["tests/test_gradcam_contract.py", "tests/test_gradients.py", "tests/test_peers_gradients.py"],
    ),
    "occlusion": (  # the package: method, engine, precision, chain, units, plan, replay
        "convscope/methods/occlusion/*",
        ["tests/test_occlusion.py"],
    ),
    # The dataset microscope's running top-k (merge, table update, per-image peaks): dataset/topk.py;
    # the rest of dataset/ (state, planning, rendering glue) is not numeric core.
    "patches_merge": (
        "convscope/dataset/topk.py",
        ["tests/test_patches.py", "tests/test_mining_fast.py"],
    ),
}

# Mutant globs a module's run is limited to when none are given on the command line, with
# ``--full``: every mutant of the module, and for
# occlusion (1,572 mutants, hours for all) every fifth one (numbers ending in 0 or 5). Name
# 'convscope.methods.occlusion.*' on the command line for all of occlusion.
_MERGE = ["convscope.dataset.topk.*"]
FULL_GLOBS: dict[str, list[str]] = {
    "occlusion": ["convscope.methods.occlusion.*__mutmut_*0", "convscope.methods.occlusion.*__mutmut_*5"],
    "patches_merge": _MERGE,
}
# Without ``--full`` (what ``make mutate`` runs: 13 minutes for all modules on 2 cores): fixed
# samples of the modules whose tests are slow. Mutant numbers are in source order, so a sample by
# last digit spreads over every function: preprocess and geometry every second mutant (even
# numbers), occlusion every twentieth (numbers ending in 00, 20, 40, 60, 80).
QUICK_GLOBS: dict[str, list[str]] = {
    **FULL_GLOBS,
    "preprocess": ["convscope.preprocess.*__mutmut_*[02468]"],
    "geometry": ["convscope.probes.geometry.*__mutmut_*[02468]"],
    "occlusion": ["convscope.methods.occlusion.*__mutmut_*[02468]0"],
}

# Tests that cannot reach a mutant (subprocess CLI checks of error text) and fail or flake
# on their own; deselected so the clean run passes.
EXTRA_PYTEST_ARGS = ["-m", "not slow and not browser and not peer",
                     "--deselect", "tests/test_validation.py::test_cli_device_meta_is_one_line_exit_2"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODULES:
        print(f"usage: python tools/mutate.py {{{','.join(MODULES)}}} [--jobs N]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    jobs = rest[rest.index("--jobs") + 1] if "--jobs" in rest else "2"
    tests_arg = rest[rest.index("--tests") + 1].split(",") if "--tests" in rest else None
    names = [a for i, a in enumerate(rest) if not a.startswith("--") and (i == 0 or rest[i - 1] not in ("--jobs", "--tests"))]
    path, tests = MODULES[name]
    tests = tests_arg or tests
    names = names or (FULL_GLOBS if "--full" in rest else QUICK_GLOBS).get(name, [])

    from mutmut import configuration
    from mutmut.__main__ import cli

    base = configuration._load_config()
    configuration._config = dataclasses.replace(
        base,
        only_mutate=[path],
        pytest_add_cli_args_test_selection=tests,
        pytest_add_cli_args=[*base.pytest_add_cli_args, *EXTRA_PYTEST_ARGS],
    )
    shutil.rmtree("mutants", ignore_errors=True)
    try:
        cli(["run", "--max-children", jobs, *names], standalone_mode=False)
    except SystemExit:
        pass
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                         check=False, capture_output=True, text=True).stdout
    counts: dict[str, int] = {}  # "not checked": outside the mutant globs of this run
    for line in out.splitlines():
        if "__mutmut_" in line and ":" in line:
            status = line.rsplit(":", 1)[1].strip()
            counts[status] = counts.get(status, 0) + 1
    total = sum(counts.values())
    survivors = []
    for line in out.splitlines():
        status = line.rsplit(":", 1)[-1].strip()
        if "__mutmut_" in line and status not in ("killed", "not checked", "skipped"):
            print("  " + line.strip())
            survivors.append(line.rsplit(":", 1)[0].strip())
    if "--diffs" in rest:  # each survivor's change, for deciding: missing test or equivalent mutant
        for mutant in survivors:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant],
                                   check=False, capture_output=True, text=True).stdout
            print(f"--- {mutant}\n{shown.strip()}")
    print(f"{path}: {total} mutants, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
