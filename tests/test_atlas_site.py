"""The atlas's static site (``render/atlas_site.py``): every page, its links, its pictures, its
escaping, the one-line errors of a damaged ``atlas.json``, and the layer page's CSS-only sort."""

from __future__ import annotations

import base64
import copy
import io
import json
import posixpath
import re
import shutil
import urllib.parse
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from atlas_fixture import make_atlas
from PIL import Image

from convscope.errors import DataError
from convscope.render.atlas_site import atlas_site, iter_atlas_site

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'none'; base-uri 'none'")
CHROMIUM = Path("/usr/bin/chromium")


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text, of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Tags:
    tags = _Tags()
    tags.feed(page)
    return tags


def _links(source: str, page: str) -> list[str]:
    """The pages ``page`` (at ``source``) links to, as paths relative to the atlas folder."""
    found = []
    for tag, attrs in _parse(page).tags:
        if tag == "a":
            href = attrs["href"]
            assert "://" not in href and not href.startswith(("/", "#", "data:")), href
            found.append(posixpath.normpath(posixpath.join(posixpath.dirname(source), urllib.parse.unquote(href))))
    return found


def _images(page: str) -> list[str]:
    return [attrs["src"] for tag, attrs in _parse(page).tags if tag == "img"]


def _reader(folder: Path, calls: list[str] | None = None) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        if calls is not None:
            calls.append(path)
        return (folder / path).read_bytes()

    return read


def _png(side: int, seed: int) -> bytes:
    picture = (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("atlas")
    return folder, make_atlas(folder)


@pytest.fixture(scope="module")
def pages(atlas: tuple[Path, dict[str, Any]]) -> dict[str, str]:
    folder, document = atlas
    return atlas_site(document, _reader(folder))


def test_a_page_for_the_site_every_layer_and_every_unit(pages: dict[str, str]) -> None:
    units = {f"units/{layer}/unit_{k}.html" for layer, n in (("stage3", 4), ("stage5", 3)) for k in range(n)}
    assert set(pages) == {"index.html", "layers/stage3.html", "layers/stage5.html"} | units
    for path, page in pages.items():
        assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>"), path
        assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page, path
        assert '<meta name="generator" content="convscope atlas">' in page
        # Nothing that could load or run anything: no script, stylesheet link, import or url().
        for banned in ("<script", "<link", "@import", "url(", "http://", "https://", "<form", "<base"):
            assert banned not in page, (path, banned)
        assert all(src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for src in _images(page))


def test_links_resolve_to_pages_of_the_site(pages: dict[str, str]) -> None:
    for source, page in pages.items():
        links = _links(source, page)
        assert links, source
        assert set(links) <= set(pages), (source, set(links) - set(pages))
        if source != "index.html":
            assert "index.html" in links, source
    assert set(_links("index.html", pages["index.html"])) >= {"layers/stage3.html", "layers/stage5.html"}
    layer = _links("layers/stage3.html", pages["layers/stage3.html"])
    assert [link for link in layer if link.startswith("units/")] == [f"units/stage3/unit_{k}.html" for k in range(4)]
    # A unit page: its layer, the index, its neighbours in the layer (none before the first).
    assert set(_links("units/stage3/unit_1.html", pages["units/stage3/unit_1.html"])) == {
        "index.html", "layers/stage3.html", "units/stage3/unit_0.html", "units/stage3/unit_2.html"}
    assert set(_links("units/stage3/unit_0.html", pages["units/stage3/unit_0.html"])) == {
        "index.html", "layers/stage3.html", "units/stage3/unit_1.html"}
    assert set(_links("units/stage5/unit_2.html", pages["units/stage5/unit_2.html"])) == {
        "index.html", "layers/stage5.html", "units/stage5/unit_1.html"}


def test_unit_page_embeds_the_atlas_pictures_in_order(atlas: tuple[Path, dict[str, Any]], pages: dict[str, str]) -> None:
    folder, document = atlas
    unit = document["layers"][0]["units"][2]
    sources = _images(pages[unit["page"]])
    assert len(sources) == 2 + 2 * 9 + 2 * 9
    expected = [unit["featurevis"], unit["negative"]]
    for kind in ("patches", "relevance_patches"):
        for patch in unit[kind]:
            expected += [patch["crop"], patch["projection"]]
    assert [base64.b64decode(src.split(",", 1)[1]) for src in sources] == [(folder / p).read_bytes() for p in expected]


def test_unit_page_without_relevance_says_it_is_absent(tmp_path: Path) -> None:
    document = make_atlas(tmp_path, {"conv": 2}, relevance=False)
    pages = atlas_site(document, _reader(tmp_path))
    page = pages["units/conv/unit_0.html"]
    assert len(_images(page)) == 2 + 2 * 9
    assert "Absent: this atlas was made without the relevance ranking" in page
    assert "not computed" in pages["index.html"]


def test_statistics_and_objectives_are_shown(pages: dict[str, str]) -> None:
    text = " ".join(" ".join(_parse(pages["units/stage3/unit_1.html"]).text).split())
    # The fixture's unit 1 of 4: mean 0.3, max 3, firing 0.9, objectives 1.5 and 0.75.
    assert "mean activation 0.3 (over 2 images" in text
    assert "max activation 3 (any cell" in text
    assert "firing 90.0% of the images" in text
    assert "objective 1.5." in text and "objective 0.75 (minus the channel mean" in text
    assert "Egyptian cat 285 5 espresso 967 4" in text
    assert "#1 · 3 · chelsea.jpg (image 0) · box (0, 0)-(40, 40)" in text
    assert "#9 · 2.2 · chelsea.jpg (image 0)" in text
    layer = " ".join(" ".join(_parse(pages["layers/stage3.html"]).text).split())
    assert "unit 3 mean 0.1 max 5 firing 70.0% objective 2.5" in layer
    index = " ".join(" ".join(_parse(pages["index.html"]).text).split())
    assert "module features.3 · 8 channels · 4 units shown" in index
    assert "images read 2" in index and "parameterization fft" in index


def _permuted(document: dict[str, Any], layer: int, maxima: list[float], means: list[float]) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    for unit, top, mean in zip(changed["layers"][layer]["units"], maxima, means, strict=True):
        unit["stats"]["max"] = top
        unit["stats"]["mean"] = mean
    return changed


def test_layer_page_ranks_units_for_each_sort(atlas: tuple[Path, dict[str, Any]]) -> None:
    folder, document = atlas
    changed = _permuted(document, 0, [5.0, 9.0, float("nan"), 7.0], [0.2, 0.2, 0.5, -1.0])
    page = atlas_site(changed, _reader(folder))["layers/stage3.html"]
    cells = [attrs for tag, attrs in _parse(page).tags if tag == "a" and "atlas-cell" in attrs.get("class", "")]
    ranks = {int(c["data-unit"]): dict(re.findall(r"--by-(\w+):(\d+)", c["style"])) for c in cells}
    by = {key: sorted(ranks, key=lambda u: int(ranks[u][key])) for key in ("unit", "max", "mean")}
    assert by == {"unit": [0, 1, 2, 3], "max": [1, 3, 0, 2], "mean": [2, 0, 1, 3]}  # NaN last, ties by unit
    for key in ("unit", "mean", "max", "firing", "objective"):
        assert f'<input type="radio" name="sort" id="sort-{key}"' in page
        assert f"#sort-{key}:checked ~ .atlas-grid > .atlas-cell {{ order: var(--by-{key}); }}" in page


def test_layer_thumbnails_are_small_jpegs(tmp_path: Path) -> None:
    document = make_atlas(tmp_path, {"conv": 1}, patches=1)
    big = _png(224, 7)
    (tmp_path / document["layers"][0]["units"][0]["featurevis"]).write_bytes(big)
    page = atlas_site(document, _reader(tmp_path))["layers/conv.html"]
    (src,) = _images(page)
    assert src.startswith("data:image/jpeg;base64,")
    thumbnail = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert thumbnail.format == "JPEG" and thumbnail.size == (96, 96)


def test_a_512_unit_layer_page_stays_small(atlas: tuple[Path, dict[str, Any]]) -> None:
    """The worst case: 512 feature visualisations of 224 px noise (PNG cannot compress them)."""
    document = atlas[1]
    template = document["layers"][0]["units"][0]
    units = []
    for k in range(512):
        unit = copy.deepcopy(template)
        unit.update(unit=k, page=f"units/big/unit_{k}.html", featurevis=f"big/unit_{k}/featurevis.png",
                    patches=[], relevance_patches=[])
        units.append(unit)
    layer = {**document["layers"][0], "name": "big", "page": "layers/big.html", "channels": 512, "units": units}
    big = {**document, "layers": [layer]}
    noise = [_png(224, seed) for seed in range(8)]

    def read(path: str) -> bytes:
        return noise[int(path.split("/")[1].removeprefix("unit_")) % 8] if path.startswith("big/") else b""

    rendered = iter_atlas_site(big, read)
    path, page = next(rendered)  # the layer page comes first
    assert path == "layers/big.html"
    assert len(_images(page)) == 512
    assert len(page.encode()) < 4_000_000  # ~3.2 MB measured; 96 px PNG thumbnails would make ~17 MB


def test_document_strings_are_escaped(tmp_path: Path) -> None:
    document = make_atlas(tmp_path, {"conv": 2}, patches=2)
    hostile = '<script>alert("x")</script>'
    layer = document["layers"][0]
    layer["name"] = hostile
    layer["path"] = "features.<b>3</b>"
    layer["page"] = "layers/a b#c?d%e.html"  # a name a URL would cut at '#' or '?'
    for unit in layer["units"]:
        unit["stats"]["classes"][0]["label"] = '<img src=x onerror="alert(1)">'
        unit["patches"][0]["image"] = '"><iframe src="https://example.com">.jpg'
    document["model"] = "model & <co>"
    pages = atlas_site(document, _reader(tmp_path))
    assert "layers/a b#c?d%e.html" in pages
    for path, page in pages.items():
        for raw in (hostile, "<img src=x", "<iframe", "<b>3</b>", "model & <co>"):
            assert raw not in page, (path, raw)
        assert set(_links(path, page)) <= set(pages), path
    unit = pages["units/conv/unit_0.html"]
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in unit
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in unit
    assert "&#34;&gt;&lt;iframe src=&#34;https://example.com&#34;&gt;.jpg" in unit
    assert 'href="../../layers/a%20b%23c%3Fd%25e.html"' in unit
    # No tag the document could have smuggled in: only the templates' own kinds.
    for page in pages.values():
        assert {tag for tag, _ in _parse(page).tags} <= {
            "html", "head", "meta", "title", "style", "body", "main", "header", "nav", "a", "span", "h1", "h2", "h3",
            "p", "section", "div", "figure", "img", "figcaption", "b", "dl", "dt", "dd", "table", "thead", "tbody",
            "tr", "th", "td", "input", "label", "details", "summary", "ul", "li", "footer"}


def _drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        *parents, last = path
        target: Any = document
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        *parents, last = path
        target: Any = document
        for key in parents:
            target = target[key]
        target[last] = value

    return change


DAMAGE = [
    (_drop(("layers", 0, "units", 1, "stats", "max")), r"layers\[0\]\.units\[1\]\.stats\.max is missing"),
    (_drop(("site",)), r"site is missing"),
    (_set(("layers", 1, "units", 0, "objective"), "high"), r"layers\[1\]\.units\[0\]\.objective is a string, not a number"),
    (_set(("layers", 0, "units", 0, "stats", "firing"), True), r"layers\[0\]\.units\[0\]\.stats\.firing is a boolean, not a number"),
    (_set(("layers", 0, "channels"), -3), r"layers\[0\]\.channels is -3, not a whole number"),
    (_set(("layers", 0, "units"), {"0": {}}), r"layers\[0\]\.units is an object, not a list"),
    (_set(("layers", 0, "units", 2), None), r"layers\[0\]\.units\[2\] is null, not an object"),
    (_set(("format",), "something-else"), r"format is 'something-else', not 'convscope-atlas'"),
    (_set(("version",), 2), r"version is 2; this convscope reads version 1"),
    (_set(("layers", 0, "units", 0, "featurevis"), "/etc/passwd"), r"layers\[0\]\.units\[0\]\.featurevis is an absolute path \('/etc/passwd'\)"),
    (_set(("layers", 0, "units", 0, "negative"), "C:/x.png"), r"layers\[0\]\.units\[0\]\.negative is an absolute path"),
    (_set(("layers", 0, "units", 0, "patches", 3, "crop"), "stage3/../../../secret.png"),
     r"layers\[0\]\.units\[0\]\.patches\[3\]\.crop climbs out of the atlas folder with '\.\.'"),
    (_set(("layers", 0, "units", 0, "relevance_patches", 0, "projection"), "a\\b.png"),
     r"layers\[0\]\.units\[0\]\.relevance_patches\[0\]\.projection holds a backslash"),
    (_set(("layers", 0, "page"), "atlas.json"), r"layers\[0\]\.page does not end in \.html"),
    (_set(("layers", 1, "page"), "./layers/stage3.html"), r"layers\[1\]\.page is not written plainly"),
    (_set(("layers", 1, "units", 0, "page"), "units/stage3/unit_0.html"),
     r"layers\[1\]\.units\[0\]\.page names the page layers\[0\]\.units\[0\]\.page names already"),
    (_set(("layers", 0, "units", 0, "patches", 0, "box"), [1, 2, 3]), r"layers\[0\]\.units\[0\]\.patches\[0\]\.box is not a list of 4 whole numbers"),
]


@pytest.mark.parametrize(("change", "message"), DAMAGE, ids=[m.split(" ")[0].replace("\\", "") for _, m in DAMAGE])
def test_a_damaged_document_is_one_line_naming_the_key(
    atlas: tuple[Path, dict[str, Any]], change: Callable[[dict[str, Any]], None], message: str
) -> None:
    folder, document = atlas
    damaged = copy.deepcopy(document)
    change(damaged)
    calls: list[str] = []
    with pytest.raises(DataError, match=r"^atlas\.json: " + message) as caught:
        atlas_site(damaged, _reader(folder, calls))
    assert "\n" not in str(caught.value)
    assert calls == []  # checked in full before a single picture is read


def test_a_document_that_is_not_an_object(atlas: tuple[Path, dict[str, Any]]) -> None:
    with pytest.raises(DataError, match=r"^atlas\.json: the document is a list, not an object"):
        atlas_site([], _reader(atlas[0]))  # type: ignore[arg-type]


def test_a_missing_or_foreign_picture_names_the_picture(tmp_path: Path) -> None:
    document = make_atlas(tmp_path, {"conv": 1}, patches=1)
    unit = document["layers"][0]["units"][0]
    (tmp_path / unit["negative"]).unlink()
    with pytest.raises(DataError, match=r"^conv/unit_0/negative\.png: cannot be read \(no such file or directory\); "
                                        r"atlas\.json names it at layers\[0\]\.units\[0\]\.negative"):
        atlas_site(document, _reader(tmp_path))
    (tmp_path / unit["negative"]).write_bytes(b"GIF89a not a png")
    with pytest.raises(DataError, match=r"^conv/unit_0/negative\.png: is not a PNG picture"):
        atlas_site(document, _reader(tmp_path))
    (tmp_path / unit["featurevis"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"^conv/unit_0/featurevis\.png: is not a readable PNG picture"):
        atlas_site(document, _reader(tmp_path))


def test_pages_are_deterministic(atlas: tuple[Path, dict[str, Any]], pages: dict[str, str]) -> None:
    folder, document = atlas
    assert atlas_site(json.loads(json.dumps(document)), _reader(folder)) == pages


# ---- in a real browser ----


def _browser_missing() -> str | None:
    import importlib.util

    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        return "chromium is not installed (apt-get install chromium): browser tests skipped"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright): browser tests skipped"
    return None


def _visual_order(page: Any) -> list[int]:
    """The units of a layer page in reading order: by row (top), then left to right."""
    boxes = page.eval_on_selector_all(
        ".atlas-cell", "cells => cells.map(c => { const r = c.getBoundingClientRect(); "
                       "return [Math.round(r.top), Math.round(r.left), Number(c.dataset.unit)]; })")
    return [unit for _, _, unit in sorted(boxes)]


@pytest.mark.browser
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_site_offline_in_chromium_navigation_and_sort(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    folder = tmp_path / "atlas"
    document = make_atlas(folder, {"stage3": 12, "stage5": 2})
    # Maxima in an order unrelated to unit ids or the other statistics.
    maxima = [3.0, 11.0, 0.5, 7.0, 9.0, 1.0, 12.0, 2.0, 8.0, 4.0, 10.0, 6.0]
    document = _permuted(document, 0, maxima, [float(u % 3) for u in range(12)])
    for path, text in atlas_site(document, _reader(folder)).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            console: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: console.append(m.text))

            def loaded(expected: str) -> None:
                page.wait_for_load_state("load")
                assert page.url == (folder / expected).as_uri()
                broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
                assert broken == 0, expected
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), expected

            page.goto((folder / "index.html").as_uri())
            loaded("index.html")
            assert page.locator(".atlas-thumbs img").count() == 6 + 2
            page.click("text=stage3")
            loaded("layers/stage3.html")
            assert _visual_order(page) == list(range(12))

            page.click("label[for=sort-max]")
            assert page.is_checked("#sort-max")
            by_max = sorted(range(12), key=lambda u: -maxima[u])
            assert _visual_order(page) == by_max == [6, 1, 10, 4, 8, 3, 11, 9, 0, 7, 5, 2]
            page.click("label[for=sort-mean]")  # means 2, 1, 0 repeating: ties by unit id
            assert _visual_order(page) == [2, 5, 8, 11, 1, 4, 7, 10, 0, 3, 6, 9]
            page.click("label[for=sort-unit]")
            assert _visual_order(page) == list(range(12))

            page.click(".atlas-cell[data-unit='4']")
            loaded("units/stage3/unit_4.html")
            assert page.locator("#featurevis img").count() == 2
            assert page.locator("#patches figure").count() == 9
            assert page.locator("#patches img").count() == 18
            assert page.locator("#relevance figure").count() == 9
            stats = " ".join(page.locator("#stats").inner_text().split())
            assert "max activation 9 (any cell of any image)" in stats
            assert "firing 60.0% of the images" in stats and "Egyptian cat" in stats
            page.click("a[rel=next]")
            loaded("units/stage3/unit_5.html")
            page.click("text=layer stage3")
            loaded("layers/stage3.html")
            page.click("text=atlas index")
            loaded("index.html")
            page.screenshot(path=str(tmp_path / "index.png"), full_page=True)

            outside = [url for url in requests if not url.startswith("data:")]
            visited = {(folder / p).as_uri() for p in ("index.html", "layers/stage3.html", "units/stage3/unit_4.html",
                                                        "units/stage3/unit_5.html")}
            assert set(outside) == visited
            assert not [m for m in console if "Content Security Policy" in m or "Refused" in m], console
        finally:
            browser.close()
