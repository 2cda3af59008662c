"""The one-page HTML report of ``convscope explore``, from the templates shared with the web app.

Pictures are embedded as ``data:image/png;base64`` URIs and the stylesheet is inlined, so the
file opens anywhere, offline, and makes no network request (its Content-Security-Policy forbids
any, and any form submission or ``<base>`` URL, which ``default-src`` does not cover). Pure: it renders an ``Exploration`` the caller computed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import markupsafe
import numpy as np

from convscope.imageio import shown_text
from convscope.render.views import Views, png_bytes

TEMPLATE_PACKAGE = "convscope.render"
# How each section lays its pictures out: one per row ("wide"), side by side ("views"), or in
# pairs (Grad-CAM next to guided Grad-CAM for each class).
LAYOUTS = {"activations": "wide", "filters": "wide", "gradcam": "views pairs", "saliency": "views pairs"}
TABLE_ONLY = {"classify"}  # shown as a table; the bar picture is for the web API


def data_uri(picture: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 -> ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")


@cache
def environment() -> Any:
    """The Jinja2 environment over ``render/templates`` (autoescaped HTML)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=False,
        lstrip_blocks=False,
        undefined=jinja2.StrictUndefined,
    )


def stylesheet() -> str:
    """The CSS shared by the report and the web page."""
    return resources.files(TEMPLATE_PACKAGE).joinpath("templates/convscope.css").read_text(encoding="utf-8")


def _human(n: float) -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}" if suffix else f"{int(n)}"
        n /= 1000.0
    return f"{n:.1f}P"


def _pair(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return ""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def faithfulness_sentence(faithfulness: dict[str, Any]) -> str:
    """The caption sentence of a map's grade (``analysis.grading.Grade.as_dict()``): whether it
    beats the random map, and both AUCs next to the random map's."""
    lead = "Beats a random map on this image" if faithfulness["beats_random"] else "Does not beat a random map"
    return (f"{lead} (insertion minus deletion AUC {faithfulness['score']:.3f} vs random "
            f"{faithfulness['random_score']:.3f}): deletion AUC {faithfulness['deletion_auc']:.3f} vs random "
            f"{faithfulness['random_deletion_auc']:.3f} (lower is better), insertion AUC "
            f"{faithfulness['insertion_auc']:.3f} vs random {faithfulness['random_insertion_auc']:.3f} "
            f"(higher is better; {faithfulness['steps']} steps).")


def graded(views: Views, faithfulness: dict[str, Any]) -> Views:
    """``views`` with the grade in the record (``"faithfulness"``) and its sentence at the end of
    the first view's caption (the picture the report, the web app and ``to_image()`` show first)."""
    first = views.views[0]
    caption = " ".join(part for part in (first.caption, faithfulness_sentence(faithfulness)) if part)
    shown = dataclasses.replace(first, caption=caption)
    files = None if views.files is None else tuple(shown if view is first else view for view in views.files)
    return dataclasses.replace(views, views=(shown, *views.views[1:]), files=files,
                               record={**views.record, "faithfulness": faithfulness})


def grading_line(grading: dict[str, tuple[int, float]]) -> str:
    """The timing line's sentence on the grades: seconds per method, and how many maps."""
    if not grading:
        return ""
    each = ", ".join(f"{name} {seconds:.1f} s" + (f" ({count} maps)" if count > 1 else "")
                     for name, (count, seconds) in grading.items())
    return f"Faithfulness grades (deletion and insertion with a random map's, not in the parts' times): {each}."


def summary_rows(result: Any) -> list[dict[str, str]]:
    """One display row per layer call of a ``ModelSummary`` (the terminal table's columns)."""
    rows = []
    for layer in result.layers:
        shape = layer.output_shape
        rows.append({
            "name": layer.name + (f" ({layer.alias})" if layer.alias else ""),
            "type": layer.type,
            "output": "x".join(str(d) for d in shape[1:]) if shape else "-",
            "params": f"{layer.params:,}",
            "ksp": f"{_pair(layer.kernel)}/{_pair(layer.stride)}/{_pair(layer.padding)}" if layer.kernel else "",
            "rf": "global" if layer.receptive_field_kind == "global"
            else "" if layer.receptive_field is None else ("" if layer.rf_exact else "~") + str(layer.receptive_field),
            "jump": "" if layer.jump is None else str(layer.jump),
        })
    return rows


def report_html(exploration: Any) -> str:
    """The report page for an ``convscope.explore.Exploration``."""
    from convscope import __version__

    sections = []
    for section in exploration.sections:
        sections.append({
            "key": section.key, "title": section.title, "intro": section.intro,
            "notes": list(getattr(section, "notes", ())),
            "layout": LAYOUTS.get(section.key, "views"),
            "figures": [
                {"title": v.title, "caption": v.caption, "src": data_uri(v.picture),
                 "small": LAYOUTS.get(section.key) == "wide" and v.picture.shape[1] < 400}
                for v in section.views if section.key not in TABLE_ONLY
            ],
        })
    c, h, w = exploration.summary.input_size
    page: str = environment().get_template("report.html.j2").render(
        exploration=exploration,
        image_name=Path(exploration.image).name,
        sections=sections,
        predictions=exploration.prediction.as_dicts(),
        summary_rows=summary_rows(exploration.summary),
        mult_adds=_human(exploration.summary.total_mult_adds),
        input_size=f"{c}x{h}x{w}",
        random_weights=str(exploration.weights).startswith("random"),
        grading=grading_line(getattr(exploration, "grading", {})),
        # Our own file, trusted: escaped, its quotes would become &#34; and the browser drop the rule.
        css=markupsafe.Markup(stylesheet()),
        version=__version__,
        created=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    # A file name that is not UTF-8 (Python's "caf\\udce9.jpg") cannot go into a UTF-8 page: U+FFFD.
    return shown_text(page)


# Written into every report's <head>; an existing file is replaced only when it carries it.
GENERATOR_MARK = b'<meta name="generator" content="convscope report">'


def is_convscope_report(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a report convscope wrote."""
    return GENERATOR_MARK in head


def write_report(path: str | Path, exploration: Any) -> Path:
    """Render and write the report atomically."""
    from convscope.imageio import atomic_write

    return atomic_write(path, report_html(exploration))
