"""The Atlas tab in a real browser (Playwright driving Debian's Chromium) against ``convscope serve --atlas``.

The atlas is the hand-written fixture recorded for the model the browser tests serve (the default,
EfficientNet-Lite0 with its packaged weights), with units that exist in its stage3 (40 channels)
and stage5 (112), so "units for this photo" runs the real model.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from atlas_fixture import make_atlas

CHROMIUM = Path("/usr/bin/chromium")
LAYERS = {"stage3": 12, "stage5": 9}


def _missing() -> str | None:
    import importlib.util

    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        return "chromium is not installed (apt-get install chromium): browser tests skipped"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright): browser tests skipped"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


@pytest.fixture(scope="module")
def atlas_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any], Path]]:
    from web_server import running_server

    folder = tmp_path_factory.mktemp("browser-atlas")
    document = make_atlas(folder / "atlas", LAYERS, channels={"stage3": 40, "stage5": 112})
    tmpdir = folder / "tmp"
    tmpdir.mkdir()
    with running_server("--atlas", str(folder / "atlas"), env={"TMPDIR": str(tmpdir)},
                        log=folder / "server.log") as base:
        yield base, document, folder / "atlas"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        try:
            yield launched
        finally:
            launched.close()


def _wait_loaded(page: Any, selector: str, count: int) -> None:
    page.wait_for_function(
        "([s, n]) => { const imgs = [...document.querySelectorAll(s)];"
        " return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=[selector, count], timeout=60_000)


def _open(browser: Any, base: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((base, "blob:", "data:")) else None)
    page.goto(base)
    page.wait_for_selector("body[data-ready=yes]", timeout=120_000)
    return page, outside


def test_atlas_tab_lists_layers_and_a_unit_shows_its_pictures_and_statistics(
        atlas_server: tuple[str, dict[str, Any], Path], browser: Any, tmp_path: Path) -> None:
    base, document, folder = atlas_server
    page, outside = _open(browser, base)
    try:
        assert page.locator("#atlas").is_hidden()  # the Explain tab comes first
        page.click("#tab-atlas")
        page.wait_for_selector("#atlas-layers a.layer-link")
        assert page.locator("#input").is_hidden()
        names = page.locator("#atlas-layers a.layer-link b").all_inner_texts()
        assert names == ["stage3", "stage5", "Units for this photo"]
        assert "12 of 40 units" in page.locator("#atlas-layers a").first.inner_text()

        page.click("#atlas-layers a[data-layer=stage3]")
        _wait_loaded(page, "#unit-grid img", 12)
        assert page.locator("#unit-grid a.unit-card").all_inner_texts() == [f"unit {k}" for k in range(12)]

        page.click("#unit-grid a[data-unit='5']")
        page.wait_for_selector("#unit-view[data-unit='5']")
        _wait_loaded(page, "#unit-patches img", 18)
        _wait_loaded(page, "#unit-view figure.featurevis img, #unit-view figure.negative img", 2)
        record = document["layers"][0]["units"][5]
        featurevis = page.locator("#unit-view figure.featurevis img")
        assert featurevis.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
        served = httpx.get(base + featurevis.get_attribute("src"), timeout=30).content
        assert served == (folder / record["featurevis"]).read_bytes()
        assert page.locator("#unit-patches figure.patch").count() == 9
        assert page.locator("#unit-patches figure.patch img").first.evaluate("i => i.naturalWidth") == 40
        assert page.locator("#unit-relevance figure.patch").count() == 9
        stats = page.locator("#unit-stats").inner_text()
        # The fixture's stats of unit 5 of 12: mean 0.1 * 7, max 2 + 5, firing 1 - 0.5.
        assert "0.7" in stats and "7" in stats and "50.0% of images" in stats
        assert "Egyptian cat × 5" in stats and "espresso × 4" in stats
        assert "objective 3.5" in page.locator("#unit-view figure.featurevis figcaption").inner_text()

        page.click("#unit-view a[rel=next]")  # the neighbour, by the address
        page.wait_for_selector("#unit-view[data-unit='6']")
        assert page.evaluate("location.hash") == "#atlas/stage3/6"
        page.go_back()
        page.wait_for_selector("#unit-view[data-unit='5']")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(tmp_path / "unit.png"), full_page=True)

        page.click("#tab-explain")
        page.wait_for_selector("#input", state="visible")
        assert page.locator("#atlas").is_hidden()
        assert outside == []
    finally:
        page.close()


def test_units_for_this_photo_link_to_unit_views_that_load(atlas_server: tuple[str, dict[str, Any], Path],
                                                          browser: Any, tmp_path: Path) -> None:
    base, _, _ = atlas_server
    expected = httpx.post(base + "api/atlas/units", data={"sample": "coffee.jpg", "layer": "stage3"}, timeout=120)
    assert expected.status_code == 200, expected.text
    ranked = [u["unit"] for u in expected.json()["units"]]
    values = [u["value"] for u in expected.json()["units"]]
    assert len(set(ranked)) == 9 and set(ranked) <= set(range(12)) and values == sorted(values, reverse=True)
    page, outside = _open(browser, base)
    try:
        page.goto(base + "#atlas-photo")
        page.wait_for_selector("#atlas-photo-form")
        page.select_option("#atlas-photo-layer", "stage3")
        page.locator("#atlas-photo-samples button[data-sample='coffee.jpg']").click()
        _wait_loaded(page, "#atlas-photo-units a.photo-unit img:not(.thumb)", 9)
        cards = page.locator("#atlas-photo-units a.photo-unit")
        assert [int(u) for u in cards.evaluate_all("cs => cs.map(c => c.dataset.unit)")] == ranked
        assert cards.first.locator("img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [224, 224]
        hrefs = cards.evaluate_all("cs => cs.map(c => c.getAttribute('href'))")
        assert hrefs == [f"#atlas/stage3/{u}" for u in ranked]
        assert "coffee.jpg" in page.locator("#atlas-photo-status").inner_text()
        # The map is a heat map over the photo: colourful, not a grey square.
        colours = cards.first.locator("img").first.evaluate(
            """i => { const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
                     const x = c.getContext('2d'); x.drawImage(i, 0, 0);
                     const d = x.getImageData(0, 0, c.width, c.height).data; let red = 0, blue = 0;
                     for (let k = 0; k < d.length; k += 4) { if (d[k] > d[k+2] + 60) red++; if (d[k+2] > d[k] + 60) blue++; }
                     return [red, blue]; }""")
        assert colours[0] > 100 and colours[1] > 100
        page.screenshot(path=str(tmp_path / "photo-units.png"), full_page=True)

        for k in (0, 8):  # the strongest and the last: each opens its unit view with its pictures
            page.locator("#atlas-photo-units a.photo-unit").nth(k).click()
            page.wait_for_selector(f"#unit-view[data-unit='{ranked[k]}']")
            _wait_loaded(page, "#unit-patches img", 18)
            _wait_loaded(page, "#unit-view figure.featurevis img", 1)
            assert page.locator("#unit-view h3").first.inner_text() == f"stage3 · unit {ranked[k]}"
            page.go_back()
            _wait_loaded(page, "#atlas-photo-units a.photo-unit img:not(.thumb)", 9)  # the results are kept
        assert outside == []
    finally:
        page.close()


def test_without_an_atlas_there_are_no_tabs(web_server: tuple[str, Path], browser: Any) -> None:
    page, _ = _open(browser, web_server[0])
    try:
        assert page.locator("#tabs").count() == 0 and page.locator("#atlas").count() == 0
        assert page.locator("#input").is_visible()
    finally:
        page.close()
