"""Terminal tables for summaries and predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000.0
    return f"{n:.1f}P{unit}"


def _shape(shape: tuple[int, ...] | None) -> str:
    return "x".join(str(d) for d in shape[1:]) if shape else "-"


def _pair(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return "-"
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def summary_table(result: Any) -> str:
    """A ``ModelSummary`` as a fixed-width table: one row per layer call, then totals and notes.

    The RF column: the receptive field's size, ``~size`` when approximate, ``global`` when every
    output cell can read the whole image."""
    header = ("layer", "type", "output", "params", "k/s/p", "RF", "jump", "start", "mult-adds")
    rows = []
    for layer in result.layers:
        name = layer.name + (f" ({layer.alias})" if layer.alias else "")
        ksp = (
            f"{_pair(layer.kernel)}/{_pair(layer.stride)}/{_pair(layer.padding)}" if layer.kernel else ""
        )
        if layer.receptive_field_kind == "global":
            rf, jump, start = "global", "", ""
        elif layer.receptive_field is None:
            rf = jump = start = ""
        else:
            mark = "" if layer.rf_exact else "~"
            rf, jump, start = f"{mark}{layer.receptive_field}", str(layer.jump), f"{layer.start:g}"
        rows.append(
            (name, layer.type, _shape(layer.output_shape), f"{layer.params:,}", ksp, rf, jump, start,
             _human(layer.mult_adds) if layer.mult_adds else "")
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    c, h, w = result.input_size
    lines += [
        "",
        f"model: {result.model}   input: {c}x{h}x{w}",
        (f"total params: {result.total_params:,}   trainable: {result.trainable_params:,}   "
         f"size: {result.param_bytes / 2**20:.2f} MB"),
        (f"mult-adds: {_human(result.total_mult_adds)}   "
         f"activations (forward, one image): {result.activation_bytes / 2**20:.2f} MB"),
    ]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def predictions_table(image: str, prediction: Any) -> str:
    """``image`` then, for a ``Prediction``, one indented line per class: probability, index, label."""
    lines = [image]
    for entry in prediction.as_dicts():
        lines.append(f"  {entry['probability']:7.2%}  {entry['index']:>5}  {entry['label']}")
    return "\n".join(lines)


def layers_table(layers: Sequence[dict[str, object]]) -> str:
    """Layer picker: name, alias, type, output shape, layout."""
    rows = [
        (str(l["name"]), str(l["alias"] or ""), str(l["type"]),
         _shape(l["output_shape"]) if isinstance(l["output_shape"], tuple) else "-",  # type: ignore[arg-type]
         str(l.get("layout", "")))
        for l in layers
    ]
    header = ("name", "alias", "type", "output", "layout")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)
