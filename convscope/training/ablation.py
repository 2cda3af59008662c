"""Ablation studies (Zeiler & Fergus Table 3): train architecture variants side by side and tabulate.

The variants themselves (parsing, module surgery) are ``convscope.models.variants``. The same seed,
data and budget are used for every variant, so the base run is the control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    base: object,
    variants: Sequence[str],
    *,
    include_base: bool = True,
    progress: Callable[[str, object], None] | None = None,
) -> AblationResult:
    """Train the base model and each variant with the same seed, data and budget; tabulate.

    Each run goes to ``<out_dir>/<variant slug>/``; a finished run (``result.json``) is reused and
    an interrupted one resumed, so a killed ablation continues where it stopped. The table is
    written to ``<out_dir>/ablation.md`` and ``ablation.json``.

    Args:
        base: a ``TrainConfig``; its ``out_dir`` is the ablation folder.
        variants: variant texts (see ``parse_variant``).
        progress: ``progress(variant, TrainProgress)`` for each training event.

    Raises:
        BadArgument: a variant that does not parse or does not fit the architecture (checked for
            all variants before anything trains), or duplicate variants.
    """
    import dataclasses
    import json
    from pathlib import Path

    from convscope.imageio import atomic_write
    from convscope.models.registry import get_spec
    from convscope.training.loop import TrainConfig, resolve_config, train

    assert isinstance(base, TrainConfig)
    root = Path(base.out_dir)
    parsed = [parse_variant(v) for v in variants]
    if include_base and not any(v.is_base for v in parsed):
        parsed.insert(0, Variant(BASE, ()))
    slugs = [v.slug for v in parsed]
    if len(set(slugs)) != len(slugs):
        duplicate = next(s for s in slugs if slugs.count(s) > 1)
        raise BadArgument("--variant", f"given twice: {duplicate}")
    resolved = resolve_config(dataclasses.replace(base, variant=None))
    spec = get_spec(resolved.arch)  # type: ignore[arg-type]
    sizes: dict[str, int] = {}
    for variant in parsed:
        # Fail fast: every variant must build and run before the first one trains.
        module = spec.build(spec.num_classes)
        if not variant.is_base:
            apply_variant(module, variant, stages=dict(spec.stages), input_size=spec.preprocess.input_size)
        sizes[variant.text] = count_parameters(module)

    rows = []
    selection = "val"
    for variant in parsed:
        run_dir = root / variant.slug
        config = dataclasses.replace(
            base, out_dir=str(run_dir), variant=None if variant.is_base else variant.text, resume=False,
            snapshot_epochs=(),
        )
        done = run_dir / "result.json"
        if done.exists():
            summary = json.loads(done.read_text("utf-8"))
            best, parameters, selection = summary["best"], summary["parameters"], summary["selection"]
            test = (summary.get("test") or {}).get("accuracy")
        else:
            config = dataclasses.replace(config, resume=(run_dir / "last.pt").exists())
            report = None if progress is None else (lambda event, name=variant.text: progress(name, event))
            result = train(config, report)
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
    atomic_write(root / "ablation.md", markdown)
    atomic_write(root / "ablation.json", json.dumps(result_table.as_dict(), indent=2) + "\n")
    return result_table


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
