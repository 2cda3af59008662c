"""``convscope explore``: one self-contained HTML page with every section, captioned pictures."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import skimage_photo
from PIL import Image

SECTIONS = ["classify", "summary", "activations", "features", "filters", "gradcam", "occlusion", "deconv", "saliency",
            "lrp", "ig", "smoothgrad"]


def check_self_contained(html: str) -> list[str]:
    """Every src/href is a data URI or an in-page anchor; returns the picture URIs."""
    links = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html)
    assert links
    for link in links:
        assert link.startswith(("data:image/png;base64,", "#")), link[:80]
    assert "http://" not in html.replace("http-equiv", "") and "https://" not in html
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    return [link for link in links if link.startswith("data:")]


def figures(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<img src="(data:[^"]+)"[^>]*>\s*<figcaption><b>([^<]+)</b>', html)


@pytest.fixture(scope="module")
def tiny_report() -> str:
    from convscope.explore import explore
    from convscope.models.load import load_model
    from convscope.render.report import report_html

    loaded = load_model("tiny", weights="random", seed=0, device="cpu")
    batch = loaded.preprocess.to_tensor(Image.open(skimage_photo("chelsea.png")).convert("RGB"))
    seen: list[str] = []
    result = explore(loaded, batch, image="chelsea.png", progress=seen.append)
    assert seen == SECTIONS
    assert list(result.timings) == SECTIONS
    return report_html(result)


def test_tiny_report_has_every_section_and_captioned_pictures(tiny_report: str) -> None:
    pictures = check_self_contained(tiny_report)
    for key in SECTIONS:
        assert f'<section id="{key}">' in tiny_report, key
    found = figures(tiny_report)
    assert len(found) == len(pictures) >= 15
    captions = re.findall(r"<figcaption><b>[^<]+</b>\s*([^<]+)</figcaption>", tiny_report)
    assert len(captions) == len(pictures)
    assert all(c.strip().endswith(".") and len(c.split()) >= 10 for c in captions)
    for uri, _ in found:
        picture = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert picture.format == "PNG" and picture.mode == "RGB"
    assert "random weights" in tiny_report or "weights are random" in tiny_report
    # Grad-CAM and guided Grad-CAM for each of the top-3 classes; feature grids and deconv of up to 3 stages.
    titles = [t for _, t in found]
    assert titles.count("Grad-CAM.") == 3 and titles.count("Guided Grad-CAM.") == 3
    assert sum(t.startswith("Feature maps of") for t in titles) == 2
    assert sum(t.startswith("Deconvnet of") for t in titles) == 1  # stages after the first
    assert {"Probability under occlusion.", "Most probable class under occlusion."} <= set(titles)
    assert any(t.startswith("Activation of conv2 channel") for t in titles)


def test_report_is_readable_without_sideways_scrolling(tiny_report: str) -> None:
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in tiny_report
    assert "max-width: 100%" in tiny_report and "overflow-x: hidden" in tiny_report


def test_inlined_stylesheet_is_not_escaped(tiny_report: str) -> None:
    # Escaped, the font list's quotes become &#34; inside <style>, and browsers drop the whole rule.
    style = tiny_report.split("<style>", 1)[1].split("</style>", 1)[0]
    assert '"Segoe UI"' in style and "&#34;" not in style and "&quot;" not in style


def test_explore_rejects_a_non_html_output(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "convscope", "explore", str(skimage_photo("coffee.png")), "--model", "tiny",
         "--weights", "random", "-o", str(tmp_path / "report.png")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: --output {tmp_path / 'report.png'}: must end in .html"]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_explore_coffee_with_the_pretrained_model(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    out = subprocess.run(
        [sys.executable, "-m", "convscope", "explore", str(skimage_photo("coffee.png")), "-o", str(target)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "espresso" in out.stdout and "time: load" in out.stdout
    html = target.read_text(encoding="utf-8")
    check_self_contained(html)
    for key in SECTIONS:
        assert f'<section id="{key}">' in html, key
    first_row = re.search(r'<table class="predictions">.*?<tbody>\s*<tr><td>([^<]+)</td>', html, re.DOTALL)
    assert first_row is not None and first_row.group(1) == "espresso"
    assert "Grad-CAM for espresso (class 967" in html
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp files left
    info: dict[str, Any] = {"bytes": len(html)}
    assert info["bytes"] < 15_000_000


def _explore(photo: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convscope", "explore", str(photo), "--model", "tiny", "--weights", "random",
         "-o", str(target)],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_explore_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "notes.html"
    mine.write_text("<html><body>my thesis notes</body></html>", encoding="utf-8")
    out = _explore(skimage_photo("coffee.png"), mine)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        (f"error: {mine}: exists and was not written by convscope; it is left as it is "
         "(remove it or choose another file name)")]
    assert mine.read_text(encoding="utf-8") == "<html><body>my thesis notes</body></html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.html"]


def test_explore_replaces_its_own_report_and_refuses_system_paths(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    assert _explore(skimage_photo("coffee.png"), target).returncode == 0
    first = target.read_text(encoding="utf-8")
    assert '<meta name="generator" content="convscope report">' in first
    again = _explore(skimage_photo("chelsea.png"), target)
    assert again.returncode == 0, again.stderr
    assert target.read_text(encoding="utf-8") != first  # the new photo's report
    system = _explore(skimage_photo("coffee.png"), Path("/proc/report.html"))
    assert system.returncode == 2
    assert system.stderr.strip().splitlines() == [
        "error: /proc: is inside /proc, a system folder, not a place for output files"]


def test_report_csp_forbids_forms_and_everything_it_forbade(tiny_report: str) -> None:
    """Issue 21, finding 19: form-action does not fall back to default-src, so it is named."""
    policies = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', tiny_report)
    assert len(policies) == 1
    directives = {d.split()[0]: d.split()[1:] for d in policies[0].split(";") if d.strip()}
    assert directives["form-action"] == ["'none'"]
    assert directives["default-src"] == ["'none'"]  # scripts, frames, fonts, connections, objects
    assert directives["img-src"] == ["data:"] and directives["style-src"] == ["'unsafe-inline'"]
    assert set(directives) == {"default-src", "img-src", "style-src", "form-action", "base-uri"}
    assert directives["base-uri"] == ["'none'"]  # neither does base-uri
