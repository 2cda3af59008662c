"""The page in a real browser: Playwright driving Debian's Chromium against a real server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import skimage_photo

CHROMIUM = Path("/usr/bin/chromium")


def _missing() -> str | None:
    import importlib.util

    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        return "chromium is not installed (apt-get install chromium): browser tests skipped"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright): browser tests skipped"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


def _browser_or_skip():  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser tests skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright): browser tests skipped")
    return sync_playwright


def _launch(p):  # type: ignore[no-untyped-def]
    return p.chromium.launch(
        executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run"],
    )


def test_report_opens_offline_and_fits_a_laptop_screen(tmp_path: Path) -> None:
    from PIL import Image

    from convscope.explore import explore
    from convscope.models.load import load_model
    from convscope.render.report import write_report

    loaded = load_model("tiny", weights="random", seed=0, device="cpu")
    batch = loaded.preprocess.to_tensor(Image.open(skimage_photo("coffee.png")).convert("RGB"))
    report = write_report(tmp_path / "report.html", explore(loaded, batch, image="coffee.png"))
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            assert [r for r in requests if not r.startswith("data:")] == [report.as_uri()]
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
            assert broken == 0 and page.evaluate("document.images.length") >= 15
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()


def test_page_classifies_upload_and_shows_gradcam(web_server: tuple[str, Path], tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    server = web_server[0]
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside: list[str] = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server, "blob:", "data:")) else None)
            page.goto(server)
            page.wait_for_selector("body[data-ready=yes]", timeout=60_000)

            page.set_input_files("input[type=file]", str(skimage_photo("coffee.png")))
            first = page.locator("#predictions tbody tr").first
            first.wait_for(timeout=60_000)
            assert "espresso" in first.inner_text()

            page.select_option("#method", "gradcam")
            page.click("#run")
            picture = page.locator("#results figure img")
            picture.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('#results figure img'); return i && i.complete && i.naturalWidth > 0; }",
                timeout=30_000,
            )
            size = picture.evaluate("i => [i.naturalWidth, i.naturalHeight]")
            assert size == [224, 224]
            assert "Grad-CAM for espresso" in page.locator("#results figcaption").inner_text()
            # The heat map is colourful (jet over the photo), not a copy of the grey page.
            colours = picture.evaluate(
                """i => { const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
                         const x = c.getContext('2d'); x.drawImage(i, 0, 0);
                         const d = x.getImageData(0, 0, c.width, c.height).data; let red = 0, blue = 0;
                         for (let k = 0; k < d.length; k += 4) { if (d[k] > d[k+2] + 60) red++; if (d[k+2] > d[k] + 60) blue++; }
                         return [red, blue]; }"""
            )
            assert colours[0] > 500 and colours[1] > 500
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 10_000
            assert outside == []  # no CDN, nothing but the app itself
        finally:
            browser.close()
