"""Explanations that grade themselves: ``analysis.grading``, its captions in the report and the
``faithfulness`` record of the web app's ``/api/explain``."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from typing import Any
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from convscope.analysis.grading import GRADE_STEPS, grade, graded_map
from convscope.analysis.quality import Protocol, causal_curves, random_map


@pytest.fixture(scope="module")
def tiny() -> Any:
    from convscope.models.load import load_model

    return load_model("tiny", weights="random")


@pytest.fixture(scope="module")
def tiny_batch(tiny: Any) -> torch.Tensor:
    from conftest import skimage_photo

    return tiny.preprocess.to_tensor(Image.open(skimage_photo("coffee.png")).convert("RGB"))  # type: ignore[no-any-return]


def test_grade_is_the_rise_curves_at_16_steps_next_to_the_random_map(tiny: Any, tiny_batch: torch.Tensor) -> None:
    from convscope.methods.gradcam import gradcam

    cam = gradcam(tiny, tiny_batch)
    cache: dict = {}
    graded = grade(tiny, tiny_batch, cam, cache=cache)
    assert graded is not None
    height, width = tiny_batch.shape[-2:]
    protocol = Protocol(step=math.ceil(height * width / GRADE_STEPS))
    deletion, insertion = causal_curves(tiny, tiny_batch, cam.maps, cam.targets, protocol)
    noise = random_map(tiny, tiny_batch, cam.targets, None, 0)
    random_deletion, random_insertion = causal_curves(tiny, tiny_batch, noise, cam.targets, protocol)
    assert graded.steps == GRADE_STEPS and graded.step_pixels == protocol.step
    assert graded.deletion_auc == pytest.approx(float(deletion.auc[0]), abs=1e-6)
    assert graded.insertion_auc == pytest.approx(float(insertion.auc[0]), abs=1e-6)
    assert graded.random_deletion_auc == pytest.approx(float(random_deletion.auc[0]), abs=1e-6)
    assert graded.random_insertion_auc == pytest.approx(float(random_insertion.auc[0]), abs=1e-6)
    assert graded.beats_random == (graded.deletion_auc < graded.random_deletion_auc
                                   and graded.insertion_auc > graded.random_insertion_auc)
    # the random map's curves are computed once per image and class
    assert list(cache.values()) == [(graded.random_deletion_auc, graded.random_insertion_auc)]
    again = grade(tiny, tiny_batch, dataclasses.replace(cam, maps=1 - cam.maps), cache=cache)
    assert again is not None and len(cache) == 1
    assert again.random_deletion_auc == graded.random_deletion_auc
    record = json.loads(json.dumps(graded.as_dict()))
    assert {"deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc", "beats_random",
            "steps"} <= set(record)


def test_only_attribution_maps_are_graded(tiny: Any, tiny_batch: torch.Tensor) -> None:
    from convscope.methods.activations import activation_maps
    from convscope.methods.guided import saliency

    assert graded_map(activation_maps(tiny, tiny_batch)) is None
    assert grade(tiny, tiny_batch, activation_maps(tiny, tiny_batch)) is None
    found = graded_map(saliency(tiny, tiny_batch))
    assert found is not None and tuple(found[0].shape) == tuple(tiny_batch.shape[-2:])


def test_occlusion_beats_random_and_its_inverse_does_not(default_model: Any) -> None:
    """On the pretrained model and a real photo, the occlusion map (where hiding the photo costs
    the class most) beats the random map on both curves; the same map upside down does not."""
    from conftest import skimage_photo

    from convscope.methods.occlusion import occlusion

    batch = default_model.preprocess.to_tensor(Image.open(skimage_photo("chelsea.png")).convert("RGB"))
    result = occlusion(default_model, batch, window=64, stride=32)
    cache: dict = {}
    good = grade(default_model, batch, result, cache=cache)
    bad = grade(default_model, batch, dataclasses.replace(result, pixel_drop=-result.pixel_drop), cache=cache)
    assert good is not None and bad is not None
    assert good.beats_random, good
    assert good.deletion_auc < good.random_deletion_auc - 0.01 and good.insertion_auc > good.random_insertion_auc + 0.05
    assert not bad.beats_random and bad.deletion_auc > bad.random_deletion_auc + 0.05, bad


def _report_parts() -> tuple:
    from convscope.explore import PARTS

    return tuple(part for part in PARTS if part.key in ("classify", "summary", "gradcam", "saliency"))


def test_report_shows_each_maps_grade_and_its_time(tiny: Any, tiny_batch: torch.Tensor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import convscope.explore as explore_module
    from convscope.methods.gradcam import gradcam
    from convscope.render.report import report_html

    monkeypatch.setattr(explore_module, "parts", _report_parts)
    exploration = explore_module.explore(tiny, tiny_batch, image="coffee.png")
    html = report_html(exploration)
    # three classes x (Grad-CAM, guided Grad-CAM), saliency, guided backprop
    assert len(re.findall(r"(Beats|Does not beat) a random map", html)) == 8
    assert set(exploration.timings) == {"classify", "summary", "gradcam", "saliency"}  # grades kept apart
    assert {name: count for name, (count, _) in exploration.grading.items()} == {
        "gradcam": 3, "guided-gradcam": 3, "saliency": 1, "guided": 1}
    assert re.search(r"Faithfulness grades \(.*\): gradcam \d+\.\d s \(3 maps\), guided-gradcam \d+\.\d s "
                     r"\(3 maps\), saliency \d+\.\d s, guided \d+\.\d s\.", html)
    expected = grade(tiny, tiny_batch, gradcam(tiny, tiny_batch, target=int(exploration.prediction.indices[0])))
    assert expected is not None
    numbers = (f"deletion AUC {expected.deletion_auc:.3f} vs random {expected.random_deletion_auc:.3f} "
               f"(lower is better), insertion AUC {expected.insertion_auc:.3f} vs random "
               f"{expected.random_insertion_auc:.3f}")
    assert numbers in html


def test_a_map_that_does_not_beat_random_says_so(tiny: Any, tiny_batch: torch.Tensor) -> None:
    from convscope.explore import context_for
    from convscope.methods.gradcam import gradcam
    from convscope.methods.registry import get_method
    from convscope.render.report import graded

    cam = gradcam(tiny, tiny_batch)
    spec = get_method("gradcam")
    views = spec.resolve_renderer()(cam, context_for(tiny, tiny_batch, spec=spec))
    verdict = {"deletion_auc": 0.5, "insertion_auc": 0.1, "random_deletion_auc": 0.25, "random_insertion_auc": 0.3,
               "score": -0.4, "random_score": 0.05, "beats_random": False, "steps": 16}
    marked = graded(views, verdict)
    assert marked.views[0].caption.startswith(views.views[0].caption)
    assert marked.views[0].caption.endswith(
        "Does not beat a random map (insertion minus deletion AUC -0.400 vs random 0.050): deletion AUC 0.500 vs "
        "random 0.250 (lower is better), insertion AUC 0.100 vs random 0.300 (higher is better; 16 steps).")
    assert marked.record["faithfulness"] is verdict and "faithfulness" not in views.record
    assert [v.caption for v in marked.views[1:]] == [v.caption for v in views.views[1:]]


def test_web_explain_carries_the_grade(tiny: Any) -> None:
    from fastapi.testclient import TestClient

    from convscope.web.app import create_app

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="PNG")
    with TestClient(create_app(model="tiny", weights="random"), raise_server_exceptions=False) as client:
        response = client.post("/api/explain", data={"method": "gradcam"},
                               files={"image": ("red.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        record = json.loads(unquote(response.headers["X-Convscope-Record"]))
        faithfulness = record["faithfulness"]
        assert faithfulness["steps"] == GRADE_STEPS and isinstance(faithfulness["beats_random"], bool)
        for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
            assert 0.0 <= faithfulness[key] <= 1.0
        caption = unquote(response.headers["X-Convscope-Caption"])
        assert f"deletion AUC {faithfulness['deletion_auc']:.3f} vs random {faithfulness['random_deletion_auc']:.3f}" in caption
        filters = client.post("/api/explain", data={"method": "filters"},
                              files={"image": ("red.png", buffer.getvalue(), "image/png")})
        assert filters.status_code == 200
        assert "faithfulness" not in json.loads(unquote(filters.headers["X-Convscope-Record"]))


def test_beating_random_is_decided_on_the_two_curves_together() -> None:
    from convscope.analysis.grading import Grade

    def grade(deletion: float, insertion: float) -> Grade:
        return Grade(deletion_auc=deletion, insertion_auc=insertion, random_deletion_auc=0.30,
                     random_insertion_auc=0.50, target=0, steps=16, step_pixels=1, seed=0, seconds=0.0)

    # a gradient map's usual pattern: far better deletion, slightly worse insertion -> beats random
    scattered = grade(0.05, 0.45)
    assert scattered.beats_random and scattered.beats_random_deletion and not scattered.beats_random_insertion
    assert abs(scattered.score - 0.40) < 1e-12 and abs(scattered.random_score - 0.20) < 1e-12
    assert not grade(0.35, 0.52).beats_random  # slightly better insertion, worse deletion: overall worse
    assert not grade(0.30, 0.50).beats_random  # a tie is not a win
    assert grade(0.05, 0.45).as_dict()["beats_random"] is True

