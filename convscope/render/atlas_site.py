"""The atlas's static site: ``index.html`` -> one page per layer -> one page per unit.

``convscope atlas`` writes a folder of pictures and its index ``atlas.json``
(``docs/atlas-format.md``); this module turns that document into HTML pages that open from
``file://`` with no server. Like the report (``render/report.py``, whose stylesheet and Jinja
environment it shares), every page carries a Content-Security-Policy that forbids any request,
script, form submission or ``<base>``: pictures are embedded as ``data:`` URIs, the stylesheet is
inlined, and the pages link each other by relative ``<a href>`` only.

A layer page sorts its units by a statistic without JavaScript: one radio input per sort key sits
before the grid, every grid item carries its rank under each key as a CSS custom property in its
``style`` attribute (``--by-max:7``), and a rule ``#sort-max:checked ~ .atlas-grid > a`` sets
``order: var(--by-max)`` on the flex items. Its thumbnails are JPEG at 96 px: a feature
visualisation is a high-frequency texture, which PNG barely compresses (about 25 KB at 96 px
against 4 KB for JPEG at quality 80), and a 512-unit layer page stays near 3 MB instead of 17 MB.
Unit pages embed the atlas's own PNG bytes unchanged.

Pure: ``atlas_site`` renders, the caller writes. The document is untrusted (a user may edit or
damage it): it is checked in full before anything is rendered, every string from it is escaped by
the templates, link targets are percent-encoded, and a picture path that is absolute or climbs
out of the folder (``..``) is refused, since the caller reads it under the atlas folder.
"""

from __future__ import annotations

import base64
import io
import math
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from convscope.atomic import os_reason, shown_text
from convscope.errors import DataError
from convscope.render.report import environment, stylesheet

DOCUMENT = "atlas.json"
FORMAT = "convscope-atlas"
VERSION = 1
# Written into every page's <head>, so a writer can tell the pages it may replace.
GENERATOR_MARK = b'<meta name="generator" content="convscope atlas">'
# The statistics a layer page sorts by: key -> the control's label. "unit" sorts up, the rest down.
SORT_KEYS: dict[str, str] = {
    "unit": "unit",
    "mean": "mean",
    "max": "max",
    "firing": "firing",
    "objective": "objective",
}
THUMBNAIL_SIDE = 96
THUMBNAIL_QUALITY = 80
INDEX_THUMBNAILS = 6  # per layer card on the index
SKIPPED_SHOWN = 50  # skipped images listed on the index; the rest are counted
# A picture larger than this is not decoded for a thumbnail (a damaged or hostile file).
MAX_PICTURE_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HINT = "the file is damaged or not an atlas; run convscope atlas again"
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class _Patch:
    image: str
    index: int
    value: float
    box: tuple[int, ...]
    crop: str
    projection: str
    where: str


@dataclass(frozen=True)
class _ClassCount:
    index: int
    label: str | None
    count: int


@dataclass(frozen=True)
class _Unit:
    unit: int
    page: str
    featurevis: str
    negative: str
    objective: float
    negative_objective: float
    mean: float
    max: float
    firing: float
    classes: tuple[_ClassCount, ...]
    patches: tuple[_Patch, ...]
    relevance_patches: tuple[_Patch, ...]
    where: str


@dataclass(frozen=True)
class _Layer:
    name: str
    path: str
    channels: int
    boxes_exact: bool
    page: str
    units: tuple[_Unit, ...]


@dataclass(frozen=True)
class _Atlas:
    model: str
    weights: str
    data: str
    images: int
    skipped: tuple[tuple[str, str], ...]
    input_size: tuple[int, ...]
    classes: str
    featurevis: tuple[tuple[str, str], ...]
    relevance: tuple[tuple[str, str], ...] | None
    site: str
    layers: tuple[_Layer, ...]


def atlas_site(document: dict[str, Any], read: Callable[[str], bytes]) -> dict[str, str]:
    """Every page of the atlas's static site.

    Args:
        document: the parsed ``atlas.json`` (``docs/atlas-format.md``).
        read: returns the bytes of a picture from its path as the document names it (relative
            to the atlas folder, ``/``-separated; checked to stay inside it before the call).

    Returns:
        ``{relative path: html}`` for ``document["site"]``, every ``layers[].page`` and every
        ``units[].page``, exactly as the document names them.

    Raises:
        DataError: the document is damaged (naming ``atlas.json`` and the key), or a picture is
            missing or not a PNG (naming the picture).
    """
    return dict(iter_atlas_site(document, read))


def iter_atlas_site(document: dict[str, Any], read: Callable[[str], bytes]) -> Iterator[tuple[str, str]]:
    """``atlas_site`` one page at a time, so a caller can write each page and let it go.

    The whole document is checked before the first page; a picture is read when its page is
    rendered. Yields each layer's page, then its units' pages, then the index.
    """
    atlas = _checked(document)
    pictures = _Pictures(read)
    env = environment()
    common = {"css": _css(), "atlas": atlas, "version": _version()}
    index_thumbs: dict[str, list[dict[str, Any]]] = {}
    for layer in atlas.layers:
        cells: list[dict[str, Any]] = []
        ranks = _ranks(layer.units)
        for position, unit in enumerate(layer.units):
            cells.append({
                "unit": unit,
                "href": _href(layer.page, unit.page),
                "thumbnail": pictures.thumbnail(unit.featurevis, f"{unit.where}.featurevis"),
                "order": ";".join(f"--by-{key}:{ranks[key][position]}" for key in SORT_KEYS),
                "stats": _stats(unit),
            })
        index_thumbs[layer.page] = [
            {"unit": cell["unit"].unit, "href": _href(atlas.site, cell["unit"].page), "src": cell["thumbnail"]}
            for cell in cells[:INDEX_THUMBNAILS]
        ]
        yield layer.page, _page(env, "atlas_layer.html.j2", common, layer=layer, cells=cells,
                                sort_keys=SORT_KEYS, index_href=_href(layer.page, atlas.site))
        for position, unit in enumerate(layer.units):
            yield unit.page, _unit_page(env, common, atlas, layer, position, pictures)
    layers = [
        {"layer": layer, "href": _href(atlas.site, layer.page), "thumbnails": index_thumbs[layer.page]}
        for layer in atlas.layers
    ]
    yield atlas.site, _page(env, "atlas_index.html.j2", common, layers=layers,
                            skipped_shown=atlas.skipped[:SKIPPED_SHOWN],
                            skipped_more=max(0, len(atlas.skipped) - SKIPPED_SHOWN))


def _unit_page(env: Any, common: dict[str, Any], atlas: _Atlas, layer: _Layer, position: int,
               pictures: _Pictures) -> str:
    unit = layer.units[position]
    previous = layer.units[position - 1] if position > 0 else None
    following = layer.units[position + 1] if position + 1 < len(layer.units) else None

    def shown(patches: Sequence[_Patch]) -> list[dict[str, Any]]:
        return [{
            "rank": rank + 1, "patch": patch, "value": _number(patch.value),
            "box": "({}, {})-({}, {})".format(*patch.box),
            "crop": pictures.embedded(patch.crop, f"{patch.where}.crop"),
            "projection": pictures.embedded(patch.projection, f"{patch.where}.projection"),
        } for rank, patch in enumerate(patches)]

    return _page(
        env, "atlas_unit.html.j2", common, layer=layer, unit=unit,
        featurevis=pictures.embedded(unit.featurevis, f"{unit.where}.featurevis"),
        negative=pictures.embedded(unit.negative, f"{unit.where}.negative"),
        objective=_number(unit.objective), negative_objective=_number(unit.negative_objective),
        stats=_stats(unit), patches=shown(unit.patches), relevance_patches=shown(unit.relevance_patches),
        index_href=_href(unit.page, atlas.site), layer_href=_href(unit.page, layer.page),
        previous=None if previous is None else {"unit": previous.unit, "href": _href(unit.page, previous.page)},
        next=None if following is None else {"unit": following.unit, "href": _href(unit.page, following.page)},
    )


def _page(env: Any, template: str, common: dict[str, Any], **values: Any) -> str:
    text: str = env.get_template(template).render(**common, **values)
    # A JSON string may hold a lone surrogate ("\ud800"), which no UTF-8 page can carry: U+FFFD.
    return shown_text(text)


def _css() -> Any:
    import markupsafe

    # The package's own stylesheet, trusted: escaped, its quotes would break the font rule.
    return markupsafe.Markup(stylesheet())


def _version() -> str:
    from convscope import __version__

    return __version__


def _href(source: str, target: str) -> str:
    """The relative URL of page ``target`` from page ``source`` (both relative to the folder)."""
    relative = posixpath.relpath(target, posixpath.dirname(source) or ".")
    # Percent-encoded: a name holding '#', '?', '%', ':' or a space still names the file.
    return urllib.parse.quote(relative, safe="/")


def _number(value: float) -> str:
    return f"{value:.4g}"


def _stats(unit: _Unit) -> dict[str, str]:
    return {
        "mean": _number(unit.mean),
        "max": _number(unit.max),
        "firing": f"{100 * unit.firing:.1f}%" if math.isfinite(unit.firing) else str(unit.firing),
        "objective": _number(unit.objective),
    }


def _ranks(units: Sequence[_Unit]) -> dict[str, list[int]]:
    """key -> each unit's place (0 first) when the layer is sorted by that key.

    Statistics sort highest first, NaN last, ties by unit id, so every order is total.
    """
    values: dict[str, Callable[[_Unit], float]] = {
        "unit": lambda u: -float(u.unit),  # negated: units go up where statistics go down
        "mean": lambda u: u.mean, "max": lambda u: u.max, "firing": lambda u: u.firing,
        "objective": lambda u: u.objective,
    }
    ranks: dict[str, list[int]] = {}
    for key in SORT_KEYS:
        keyed = [(values[key](unit), unit.unit, i) for i, unit in enumerate(units)]
        order = sorted(keyed, key=lambda item: (math.isnan(item[0]), 0.0 if math.isnan(item[0]) else -item[0],
                                               item[1], item[2]))
        place = [0] * len(units)
        for rank, (_, _, i) in enumerate(order):
            place[i] = rank
        ranks[key] = place
    return ranks


class _Pictures:
    """Reads pictures through the caller's ``read`` and turns them into ``data:`` URIs."""

    def __init__(self, read: Callable[[str], bytes]) -> None:
        self._read = read

    def _bytes(self, path: str, where: str) -> bytes:
        try:
            data = self._read(path)
        except OSError as exc:
            raise DataError(path, f"cannot be read ({os_reason(exc)}); {DOCUMENT} names it at {where}",
                            hint="the atlas folder is incomplete; run convscope atlas again") from exc
        if not isinstance(data, bytes | bytearray) or not bytes(data[:8]) == PNG_SIGNATURE:
            raise DataError(path, f"is not a PNG picture; {DOCUMENT} names it at {where}", hint=_HINT)
        return bytes(data)

    def embedded(self, path: str, where: str) -> str:
        return "data:image/png;base64," + base64.b64encode(self._bytes(path, where)).decode("ascii")

    def thumbnail(self, path: str, where: str) -> str:
        from PIL import Image

        data = self._bytes(path, where)
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                # Checked before decoding: Image.open only reads the header.
                if image.width * image.height > MAX_PICTURE_PIXELS:
                    raise DataError(path, f"is {image.width}x{image.height} pixels, more than a feature "
                                          f"visualisation ({DOCUMENT} names it at {where})", hint=_HINT)
                picture = image.convert("RGB")
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(path, f"is not a readable PNG picture; {DOCUMENT} names it at {where}",
                            hint=_HINT) from exc
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- checking the document: every failure is one line naming atlas.json and the key ----


def _damaged(where: str, reason: str) -> DataError:
    return DataError(DOCUMENT, f"{where} {reason}", hint=_HINT)


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _key(mapping: Any, key: str, where: str) -> tuple[Any, str]:
    name = f"{where}.{key}" if where else key
    if not isinstance(mapping, dict):
        raise _damaged(where or "the document", f"is {_kind(mapping)}, not an object")
    if key not in mapping:
        raise _damaged(name, "is missing")
    return mapping[key], name


def _text(mapping: Any, key: str, where: str) -> str:
    value, name = _key(mapping, key, where)
    if not isinstance(value, str):
        raise _damaged(name, f"is {_kind(value)}, not a string")
    return value


def _real(mapping: Any, key: str, where: str) -> float:
    value, name = _key(mapping, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _damaged(name, f"is {_kind(value)}, not a number")
    return float(value)


def _whole(mapping: Any, key: str, where: str) -> int:
    value, name = _key(mapping, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _damaged(name, f"is {value!r:.40}, not a whole number >= 0")
    return value


def _items(mapping: Any, key: str, where: str) -> tuple[list[Any], str]:
    value, name = _key(mapping, key, where)
    if not isinstance(value, list):
        raise _damaged(name, f"is {_kind(value)}, not a list")
    return value, name


def _numbers(mapping: Any, key: str, where: str, length: int) -> tuple[int, ...]:
    value, name = _items(mapping, key, where)
    if len(value) != length or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise _damaged(name, f"is not a list of {length} whole numbers")
    return tuple(value)


def _relative(mapping: Any, key: str, where: str, *, page: bool = False) -> str:
    """A path the document names, refused unless it is relative, ``/``-separated and inside the folder."""
    path = _text(mapping, key, where)
    name = f"{where}.{key}" if where else key
    shown = repr(shown_text(path)[:80])
    if not path:
        raise _damaged(name, "is an empty path")
    if path.startswith("/") or _DRIVE.match(path):
        raise _damaged(name, f"is an absolute path ({shown}); paths must stay inside the atlas folder")
    if "\\" in path or any(ord(ch) < 32 for ch in path):
        raise _damaged(name, f"holds a backslash or a control character ({shown}); paths use '/'")
    if ".." in path.split("/"):
        raise _damaged(name, f"climbs out of the atlas folder with '..' ({shown})")
    if posixpath.normpath(path) != path:
        # './a' and 'a//b' name the file 'a' and 'a/b' name: two spellings would hide a duplicate page.
        raise _damaged(name, f"is not written plainly ({shown}); write {posixpath.normpath(path)!r}")
    if page and not path.endswith(".html"):
        raise _damaged(name, f"does not end in .html ({shown}); a page of the site must")
    return path


def _settings(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _damaged(name, f"is {_kind(value)}, not an object")
    return tuple((str(k), _shown_value(v)) for k, v in value.items())


def _shown_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    return str(value)


def _patches(record: Any, key: str, where: str) -> tuple[_Patch, ...]:
    entries, name = _items(record, key, where)
    patches = []
    for i, entry in enumerate(entries):
        at = f"{name}[{i}]"
        image, image_name = _key(entry, "image", at)
        if isinstance(image, bool) or not isinstance(image, str | int):
            raise _damaged(image_name, f"is {_kind(image)}, not a path or a position")
        patches.append(_Patch(
            image=str(image), index=_whole(entry, "index", at), value=_real(entry, "value", at),
            box=_numbers(entry, "box", at, 4), crop=_relative(entry, "crop", at),
            projection=_relative(entry, "projection", at), where=at,
        ))
    return tuple(patches)


def _classes(stats: Any, where: str) -> tuple[_ClassCount, ...]:
    entries, name = _items(stats, "classes", where)
    counts = []
    for i, entry in enumerate(entries):
        at = f"{name}[{i}]"
        label = entry.get("label") if isinstance(entry, dict) else None
        if label is not None and not isinstance(label, str):
            raise _damaged(f"{at}.label", f"is {_kind(label)}, not a string")
        counts.append(_ClassCount(index=_whole(entry, "class", at), label=label, count=_whole(entry, "count", at)))
    return tuple(counts)


def _unit(record: Any, where: str) -> _Unit:
    stats, stats_name = _key(record, "stats", where)
    return _Unit(
        unit=_whole(record, "unit", where), page=_relative(record, "page", where, page=True),
        featurevis=_relative(record, "featurevis", where), negative=_relative(record, "negative", where),
        objective=_real(record, "objective", where), negative_objective=_real(record, "negative_objective", where),
        mean=_real(stats, "mean", stats_name), max=_real(stats, "max", stats_name),
        firing=_real(stats, "firing", stats_name), classes=_classes(stats, stats_name),
        patches=_patches(record, "patches", where), relevance_patches=_patches(record, "relevance_patches", where),
        where=where,
    )


def _layer(record: Any, where: str) -> _Layer:
    boxes_exact, boxes_name = _key(record, "boxes_exact", where)
    if not isinstance(boxes_exact, bool):
        raise _damaged(boxes_name, f"is {_kind(boxes_exact)}, not true or false")
    units, units_name = _items(record, "units", where)
    return _Layer(
        name=_text(record, "name", where), path=_text(record, "path", where),
        channels=_whole(record, "channels", where), boxes_exact=boxes_exact,
        page=_relative(record, "page", where, page=True),
        units=tuple(_unit(unit, f"{units_name}[{i}]") for i, unit in enumerate(units)),
    )


def _checked(document: Any) -> _Atlas:
    """The document, checked in full: every key the site shows, with its kind."""
    kind, _ = _key(document, "format", "")
    if kind != FORMAT:
        raise _damaged("format", f"is {kind!r:.40}, not {FORMAT!r}")
    version, _ = _key(document, "version", "")
    if version != VERSION:
        raise DataError(DOCUMENT, f"version is {version!r:.20}; this convscope reads version {VERSION}",
                        hint="open it with the convscope that wrote it, or run convscope atlas again")
    skipped_entries, skipped_name = _items(document, "skipped", "")
    skipped = tuple((_shown_value(_key(entry, "path", f"{skipped_name}[{i}]")[0]),
                     _shown_value(_key(entry, "error", f"{skipped_name}[{i}]")[0]))
                    for i, entry in enumerate(skipped_entries))
    relevance, relevance_name = _key(document, "relevance", "")
    featurevis, featurevis_name = _key(document, "featurevis", "")
    layer_records, layers_name = _items(document, "layers", "")
    atlas = _Atlas(
        model=_text(document, "model", ""), weights=_text(document, "weights", ""),
        data=_text(document, "data", ""), images=_whole(document, "images", ""), skipped=skipped,
        input_size=_numbers(document, "input_size", "", 2), classes=_text(document, "classes", ""),
        featurevis=_settings(featurevis, featurevis_name),
        relevance=None if relevance is None else _settings(relevance, relevance_name),
        site=_relative(document, "site", "", page=True),
        layers=tuple(_layer(record, f"{layers_name}[{i}]") for i, record in enumerate(layer_records)),
    )
    seen: dict[str, str] = {atlas.site: "site"}
    for i, layer in enumerate(atlas.layers):
        named = [(layer.page, f"layers[{i}].page")] + [(unit.page, f"{unit.where}.page") for unit in layer.units]
        for page, name in named:
            if page in seen:
                raise _damaged(name, f"names the page {seen[page]} names already ({shown_text(page)[:80]!r})")
            seen[page] = name
    return atlas
