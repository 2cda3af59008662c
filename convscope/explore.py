"""One image, many methods: the composition behind ``convscope explore`` and the web app.

``explain`` runs one registry method on one image and hands the result to the row's renderer;
``explore`` runs the report's whole programme (top-5, summary, activation maps, feature grids,
filters, Grad-CAM and guided Grad-CAM for the top classes, occlusion, deconvnet, saliency) and
returns sections of captioned pictures with the time each part took. Nothing here draws or
writes a file: pictures come from ``render.views`` and HTML from ``render.report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from convscope.methods.registry import MethodSpec, get_method
from convscope.render.pictures import display_image
from convscope.render.views import View, ViewContext, Views
from convscope.types import LoadedModel, ModelSummary, Prediction

Progress = Callable[[str], None]

# The report is an overview: a coarser occlusion grid (13x13 positions of a 32 px square on a
# 224 px input, instead of the CLI's 27x27 of 16 px) and six projections per layer keep
# `convscope explore` to seconds per part; the web app and the CLI offer the fine settings.
OCCLUSION_OPTIONS = {"window": 32, "stride": 16}
DECONV_TOP = 6


def context_for(loaded: LoadedModel, batch: torch.Tensor | None, index: int = 0) -> ViewContext:
    photo = display_image(loaded.preprocess, batch.detach().cpu(), index) if batch is not None else None
    return ViewContext(photo=photo, model=loaded.name, weights=loaded.weights, index=index)


def explain(
    loaded: LoadedModel,
    batch: torch.Tensor,
    method: str | MethodSpec,
    *,
    layer: str | None = None,
    target: int | str | None = None,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Views:
    """Run one registry method on a ``(1, C, H, W)`` batch and render it.

    Raises:
        UnknownMethod, UnknownLayer, BadTarget, BadArgument: from the registry or the method.
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    result = spec.run(loaded, batch, target=target, layer=layer, options=options, progress=progress)
    return spec.resolve_renderer()(result, context_for(loaded, batch))  # type: ignore[no-any-return]


@dataclass
class Section:
    """A part of the report: ``key`` (the HTML anchor), ``title``, an intro sentence, pictures."""

    key: str
    title: str
    intro: str
    views: list[View] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Exploration:
    """Everything ``convscope explore`` puts in the report for one image."""

    image: str
    model: str
    weights: str
    prediction: Prediction
    summary: ModelSummary
    sections: list[Section]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spread from first to last (all of them when fewer)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / (count - 1)
    return [items[round(k * step)] for k in range(count)]


def explore(
    loaded: LoadedModel,
    batch: torch.Tensor,
    *,
    image: str = "image",
    target: int | str | None = None,
    progress: Progress | None = None,
) -> Exploration:
    """The report's programme on one image (``(1, C, H, W)`` normalised batch)."""
    from convscope.methods.summary import summary

    timings: dict[str, float] = {}
    warnings: list[str] = []
    sections: list[Section] = []

    def step(name: str) -> float:
        if progress is not None:
            progress(name)
        return time.perf_counter()

    def section(key: str, title: str, intro: str, started: float) -> Section:
        made = Section(key, title, intro, seconds=time.perf_counter() - started)
        timings[key] = timings.get(key, 0.0) + made.seconds
        sections.append(made)
        return made

    def keep(views: Views) -> list[View]:
        warnings.extend(w for w in views.record.get("warnings", []) if w not in warnings)
        return list(views.views)

    started = step("classify")
    classify_spec = get_method("classify")
    predictions = classify_spec.run(loaded, batch, options={"topk": 5})
    prediction = predictions[0]
    classified = classify_spec.resolve_renderer()(predictions, context_for(loaded, batch))
    part = section("classify", "Top-5 classes", "What the network says the photo shows.", started)
    part.views = keep(classified)

    started = step("summary")
    model_summary = summary(loaded)
    section("summary", "Layers and receptive fields",
            "Each layer's output shape, parameters, kernel/stride/padding and receptive field: how many input "
            "pixels one cell of its output sees.", started)

    stages = list(loaded.stages)
    started = step("activations")
    part = section("activations", "Activation maps", "One forward pass, every conv stage.", started)
    part.views = keep(explain(loaded, batch, "activations"))[:1]
    part.seconds = timings["activations"] = time.perf_counter() - started

    grid_layers = spread(stages, 3) or [loaded.cam_layer]
    started = step("features")
    part = section("features", "Feature maps of three layers",
                   "The most active channels of an early, a middle and a late stage.", started)
    for name in grid_layers:
        part.views += keep(explain(loaded, batch, "features", layer=name,
                                   options={"max_channels": 32, "order": "activation"}))
    part.seconds = timings["features"] = time.perf_counter() - started

    started = step("filters")
    part = section("filters", "First-layer filters", "What the first convolution looks for.", started)
    part.views = keep(explain(loaded, batch, "filters"))

    classes: list[int | str] = []
    if target is not None:
        classes.append(target)
    for index in prediction.indices.tolist():
        if len(classes) >= 3:
            break
        if int(index) not in classes:
            classes.append(int(index))
    started = step("gradcam")
    part = section("gradcam", "Grad-CAM and guided Grad-CAM",
                   f"For the {len(classes)} classes the network finds most probable"
                   + (" (the asked class first)" if target is not None else "") + ".", started)
    for cls in classes:
        part.views += keep(explain(loaded, batch, "gradcam", target=cls))[:1]
        part.views += keep(explain(loaded, batch, "guided-gradcam", target=cls))[:1]
    part.seconds = timings["gradcam"] = time.perf_counter() - started

    started = step("occlusion")
    part = section("occlusion", "Occlusion sensitivity",
                   "A grey square slid over the photo (Zeiler & Fergus, Fig. 7).", started)
    occlusion_layer = stages[-1] if stages else loaded.cam_layer
    part.views = keep(explain(loaded, batch, "occlusion", target=target, layer=occlusion_layer,
                              options=OCCLUSION_OPTIONS))
    part.seconds = timings["occlusion"] = time.perf_counter() - started

    started = step("deconv")
    part = section("deconv", "Deconvnet projections",
                   "The strongest channels of three layers projected back to pixels (Zeiler & Fergus, Fig. 2).",
                   started)
    # The first stage sees a few pixels (a 3x3 crop says little); project from the later ones.
    for name in spread(stages[1:], 3) or grid_layers:
        part.views += keep(explain(loaded, batch, "deconv", layer=name, options={"top": DECONV_TOP}))[:1]
    part.seconds = timings["deconv"] = time.perf_counter() - started

    started = step("saliency")
    part = section("saliency", "Saliency and guided backprop",
                   "Input gradients: which pixels the class score is most sensitive to.", started)
    part.views = keep(explain(loaded, batch, "saliency", target=target))[:1]
    part.views += keep(explain(loaded, batch, "guided", target=target))[:1]
    part.seconds = timings["saliency"] = time.perf_counter() - started

    return Exploration(
        image=image, model=loaded.name, weights=loaded.weights, prediction=prediction,
        summary=model_summary, sections=sections, timings=timings, warnings=warnings,
    )
