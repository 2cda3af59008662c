"""Ablation studies (Zeiler & Fergus Table 3): train architecture variants side by side and tabulate.

The variants themselves (parsing, module surgery) are ``convscope.models.variants``. The same seed,
data and budget are used for every variant, so the base run is the control.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from convscope.errors import BadArgument
from convscope.models.variants import (
    BASE,
    Operation,
    Variant,
    apply_variant,
    count_parameters,
    parse_variant,
    variant_builder,
)
from convscope.training.config import TrainConfig, compare_configs, resolve_config
from convscope.training.loop import train
from convscope.training.runrecord import RunFolderError, RunRecord, inspect_run_folder
from convscope.training.wording import literal, option_error

TABLES = ("ablation.md", "ablation.json")
# The tables' own record: the ablation folder is not a run, and train --overwrite never touches it.
TABLE_RECORD = "ablation.run.json"

__all__ = [
    "BASE",
    "AblationResult",
    "AblationRow",
    "Operation",
    "Variant",
    "ablate",
    "ablation_table",
    "apply_variant",
    "count_parameters",
    "parse_variant",
    "variant_builder",
]


# -- running an ablation study ------------------------------------------------------------------


@dataclass(frozen=True)
class AblationRow:
    """One trained variant.

    Attributes:
        variant: the variant text (``base`` for the unchanged model).
        parameters: total parameters of the variant.
        train_error: training error of the best epoch (with augmentation, dropout on).
        held_out_error: validation error of the best epoch (the split that chose it), or ``None``
            when there was no validation split and the last epoch was kept.
        test_error: test error of the variant's ``best.pt``, measured once after training, when
            the data has a test split.
        best_epoch: the epoch those numbers come from.
        run_dir: the variant's run folder.
    """

    variant: str
    parameters: int
    train_error: float
    held_out_error: float | None
    test_error: float | None
    best_epoch: int
    run_dir: str


@dataclass(frozen=True)
class AblationResult:
    rows: tuple[AblationRow, ...]
    selection: str
    markdown: str

    def as_dict(self) -> dict[str, object]:
        from dataclasses import asdict

        return {"selection": self.selection, "rows": [asdict(r) for r in self.rows]}


def ablate(
    base: TrainConfig,
    variants: Sequence[str],
    *,
    include_base: bool = True,
    progress: Callable[[str, object], None] | None = None,
) -> AblationResult:
    """Train the base model and each variant with the same seed, data and budget; tabulate.

    Each run goes to ``<out_dir>/<variant slug>/``; a finished run (``result.json``) is reused and
    an interrupted one resumed, so a killed ablation continues where it stopped. The table is
    written to ``<out_dir>/ablation.md`` and ``ablation.json`` (their checksums in
    ``ablation.run.json``); tables convscope did not write are never replaced.

    Args:
        base: a ``TrainConfig``; its ``out_dir`` is the ablation folder.
        variants: variant texts (see ``parse_variant``).
        progress: ``progress(variant, TrainProgress)`` for each training event.

    Raises:
        BadArgument: a variant that does not parse or does not fit the architecture (checked for
            all variants before anything trains), or duplicate variants.
        RunFolderError: tables convscope did not write, a variant folder holding files no run
            wrote or a run with other options (all checked before anything trains).
    """
    import dataclasses
    import json

    from convscope.models.registry import get_spec

    root = Path(base.out_dir)
    parsed = [parse_variant(v) for v in variants]
    if include_base and not any(v.is_base for v in parsed):
        parsed.insert(0, Variant(BASE, ()))
    slugs = [v.slug for v in parsed]
    if len(set(slugs)) != len(slugs):
        duplicate = next(s for s in slugs if slugs.count(s) > 1)
        raise option_error(BadArgument, "{variant}", f"given twice: {literal(duplicate)}")
    resolved = resolve_config(dataclasses.replace(base, variant=None))
    spec = get_spec(resolved.arch)  # type: ignore[arg-type]
    sizes: dict[str, int] = {}
    for variant in parsed:
        # Fail fast: every variant must build and run before the first one trains.
        module = spec.build(spec.num_classes)
        if not variant.is_base:
            apply_variant(module, variant, stages=dict(spec.stages), input_size=spec.preprocess.input_size)
        sizes[variant.text] = count_parameters(module)
    # ...and every folder must be usable: the tables ours, each variant folder empty or this run's.
    tables = _table_record(root)
    configs = [
        dataclasses.replace(base, out_dir=str(root / v.slug), variant=None if v.is_base else v.text, resume=False,
                            snapshot_epochs=())
        for v in parsed
    ]
    states = [_variant_state(config) for config in configs]

    rows = []
    selection = "val"
    for variant, config, state in zip(parsed, configs, states, strict=True):
        run_dir = Path(config.out_dir)
        if state == "finished":
            summary = json.loads((run_dir / "result.json").read_text("utf-8"))
            best, parameters, selection = summary["best"], summary["parameters"], summary["selection"]
            test = (summary.get("test") or {}).get("accuracy")
        else:
            report = None if progress is None else (lambda event, name=variant.text: progress(name, event))
            # An interrupted variant resumes; one killed before its first checkpoint starts again
            # (its recorded files, and only those, are replaced).
            result = train(dataclasses.replace(config, resume=state == "interrupted"), report,
                           overwrite=state == "started")
            best, parameters, selection = result.best, result.parameters, result.selection
            test = result.test_accuracy
        held = best.get("val_accuracy") if selection == "val" else None
        rows.append(
            AblationRow(
                variant=variant.text,
                parameters=int(parameters),
                train_error=1.0 - float(best["train_accuracy"]),
                held_out_error=None if held is None else 1.0 - float(held),
                test_error=None if test is None else 1.0 - float(test),
                best_epoch=int(best["epoch"]),
                run_dir=str(run_dir),
            )
        )
    markdown = ablation_table(rows, selection)
    result_table = AblationResult(tuple(rows), selection, markdown)
    if tables is None:
        tables = RunRecord.start(root, command="ablate", name=TABLE_RECORD)
    tables.write(TABLES[0], markdown)
    tables.write(TABLES[1], json.dumps(result_table.as_dict(), indent=2) + "\n")
    return result_table


def _table_record(root: Path) -> RunRecord | None:
    """The record of the tables an earlier ablation wrote into ``root``; refuses tables it did not write.

    Raises:
        RunFolderError: ``ablation.md`` or ``ablation.json`` exists and no convscope ablation wrote
            it (or it changed since).
    """
    record = RunRecord.read(root, TABLE_RECORD)
    legacy = record is None and _legacy_tables(root)
    for name in TABLES:
        path = root / name
        if os.path.lexists(path) and not legacy and not (record is not None and record.owns(name)):
            raise RunFolderError(
                str(path), "was not written by convscope ablate (or changed since); it is left as it is",
                "move it away, or write the ablation into another folder",
            )
    return record


def _legacy_tables(root: Path) -> bool:
    """Tables from before their record: ours when ``ablation.md`` is exactly the table of ``ablation.json``."""
    import json

    try:
        text = (root / TABLES[1]).read_text("utf-8")
        raw = json.loads(text)
        rows = tuple(AblationRow(**row) for row in raw["rows"])
        table = AblationResult(rows, raw["selection"], ablation_table(rows, raw["selection"]))
        return (
            json.dumps(table.as_dict(), indent=2) + "\n" == text
            and (root / TABLES[0]).read_text("utf-8") == table.markdown
        )
    except (OSError, ValueError, TypeError, KeyError):
        return False


def _variant_state(config: TrainConfig) -> str:
    """``new``, ``started`` (no checkpoint yet), ``interrupted`` or ``finished``, for a variant's folder.

    Raises:
        RunFolderError: the folder holds files no convscope run wrote, or a run with other options.
    """
    import json

    contents = inspect_run_folder(config.out_dir)
    contents.refuse_foreign_run_names()
    if contents.foreign_other:
        raise RunFolderError(
            config.out_dir, f"holds files no convscope run wrote ({literal(', '.join(contents.foreign_other[:4]))})",
            "move them away, or write the ablation into another folder",
        )
    if not contents.has_earlier_run:
        return "new"
    if "config.json" in contents.earlier:
        saved = TrainConfig.from_json(json.loads((Path(config.out_dir) / "config.json").read_text("utf-8")))
        differences = compare_configs(resolve_config(config), saved, free=("resume", "out_dir", "device"))
        if differences:
            raise RunFolderError(
                config.out_dir,
                literal(f"holds an earlier run ({contents.describe()}) with other options: "
                        + "; ".join(differences[:4]) + " (given vs saved)"),
                "rerun the ablation with the same options, or write it into another folder",
            )
    if contents.finished:
        return "finished"
    return "interrupted" if "last.pt" in contents.earlier else "started"


def ablation_table(rows: Sequence[AblationRow], selection: str) -> str:
    """Markdown table in the spirit of Zeiler & Fergus Table 3 (errors in %)."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    base = next((r for r in rows if r.variant == BASE), None)
    # "vs base" compares test errors, or validation errors when the data has no test split.
    show_held = selection == "val"
    header = ["variant", "parameters", "train error %"]
    if show_held:
        header.append("val error %")
    header += ["test error %", "vs base (points)", "best epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        delta = "-"
        mine, theirs = _compared(row), _compared(base) if base is not None else None
        if base is not None and row is not base and mine is not None and theirs is not None:
            delta = f"{100 * (mine - theirs):+.2f}"
        cells = [row.variant, f"{row.parameters:,}", pct(row.train_error)]
        if show_held:
            cells.append(pct(row.held_out_error))
        cells += [pct(row.test_error), delta, str(row.best_epoch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _compared(row: AblationRow) -> float | None:
    return row.test_error if row.test_error is not None else row.held_out_error
