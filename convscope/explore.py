"""One image, many methods: the composition behind ``convscope explore`` and the web app.

``explain`` runs one registry method on one image and hands the result to the row's renderer;
``explore`` runs the report's ``PARTS``, a table of sections (top-5, summary, activation maps,
feature grids, filters, Grad-CAM and guided Grad-CAM for the top classes, occlusion, deconvnet,
saliency), and returns them as sections of views with the time each part took. Nothing here draws or
writes a file: pictures come from ``render.views`` and HTML from ``render.report``.

Every attribution map (CAMs, gradient maps, occlusion, LRP/IG/SmoothGrad) grades itself: its
deletion and insertion AUC on the image next to a seeded random map's (``analysis.grading``), in
its record (``"faithfulness"``) and at the end of its caption; the report's timing line lists the
grades' seconds per method (``Exploration.grading``, kept out of the parts' ``timings``). ``explain(..., grade=True)`` does the same for one method (the web app).

A method that cannot run on the model (a ``ConvscopeError``: a layer that is not a feature map, a
refused option...) drops out of the report with a note, in its section (``Section.notes``) and in
the page's notes (``Exploration.warnings``); the other parts still run. Classification cannot
drop out: the report is about its answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from convscope.analysis.grading import RandomCache
from convscope.analysis.grading import grade as grade_map
from convscope.errors import ConvscopeError
from convscope.methods.registry import MethodSpec, get_method, list_methods
from convscope.render.pictures import display_image
from convscope.render.report import graded
from convscope.render.views import View, ViewContext, Views
from convscope.types import LoadedModel, ModelSummary, Prediction

Progress = Callable[[str], None]

# The report is an overview: a coarser occlusion grid (13x13 positions of a 32 px square on a
# 224 px input, instead of the CLI's 27x27 of 16 px) and six projections per layer keep
# `convscope explore` to seconds per part; the web app and the CLI offer the fine settings.
OCCLUSION_OPTIONS = {"window": 32, "stride": 16}
DECONV_TOP = 6


def context_for(loaded: LoadedModel, batch: torch.Tensor | None, index: int = 0,
                spec: MethodSpec | None = None) -> ViewContext:
    """What ``spec``'s renderer knows about image ``index`` of ``batch``."""
    photo = display_image(loaded.preprocess, batch.detach().cpu(), index) if batch is not None else None
    return ViewContext(photo=photo, model=loaded.name, weights=loaded.weights, index=index, loaded=loaded,
                       title=spec.title if spec else "", method=spec.name if spec else "")


def graded_views(loaded: LoadedModel, batch: torch.Tensor, result: Any, views: Views,
                 cache: RandomCache | None = None) -> tuple[Views, float]:
    """``views`` with the result's grade (unchanged for a result that is not an attribution map)
    and the seconds the grade took."""
    grade = grade_map(loaded, batch, result, cache=cache)
    if grade is None:
        return views, 0.0
    return graded(views, grade.as_dict()), grade.seconds


def explain(
    loaded: LoadedModel,
    batch: torch.Tensor,
    method: str | MethodSpec,
    *,
    layer: str | None = None,
    target: int | str | None = None,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    grade: bool = False,
) -> Views:
    """Run one registry method on a ``(1, C, H, W)`` batch and render it; ``grade``: add an
    attribution map's faithfulness (``graded_views``).

    Raises:
        UnknownMethod, UnknownLayer, BadTarget, BadArgument: from the registry or the method.
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    result = spec.run(loaded, batch, target=target, layer=layer, options=options, progress=progress)
    views: Views = spec.resolve_renderer()(result, context_for(loaded, batch, spec=spec))
    return graded_views(loaded, batch, result, views)[0] if grade else views


@dataclass
class Section:
    """A part of the report: ``key`` (the HTML anchor), ``title``, an intro sentence, pictures,
    and ``notes``: one line per run that could not be made (the method's error)."""

    key: str
    title: str
    intro: str
    views: list[View] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


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
    grading: dict[str, tuple[int, float]] = field(default_factory=dict)
    """method -> (maps graded, seconds): the faithfulness grades, outside the parts' ``timings``."""


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spread from first to last (all of them when fewer)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / (count - 1)
    return [items[round(k * step)] for k in range(count)]


def _no_layer(loaded: LoadedModel) -> list[str | None]:
    return [None]


def _three_stages(loaded: LoadedModel) -> list[str | None]:
    """An early, a middle and a late stage."""
    return list(spread(list(loaded.stages), 3)) or [loaded.cam_layer]


def _last_stage(loaded: LoadedModel) -> list[str | None]:
    stages = list(loaded.stages)
    return [stages[-1] if stages else loaded.cam_layer]


def _later_stages(loaded: LoadedModel) -> list[str | None]:
    # The first stage sees a few pixels (a 3x3 crop says little); project from the later ones.
    return list(spread(list(loaded.stages)[1:], 3)) or _three_stages(loaded)


@dataclass(frozen=True)
class Part:
    """A section of the report: which registry methods it runs, at which layers, for which classes.

    Attributes:
        key: the HTML anchor and timing key; ``title`` and ``intro`` head the section (``intro``
            may say ``{count}``, the number of classes, and ``{asked}``, a note on the asked class).
        methods: registry rows run for each layer (and class), in order.
        layers: ``(model) -> layers`` to run at (``[None]``: the method's default).
        per_class: run for the three most probable classes (the asked one first), else for the
            asked class (``None``: the most probable).
        options: the methods' options.
        main_only: show each run's main view only.
    """

    key: str
    title: str
    intro: str
    methods: tuple[str, ...] = ()
    layers: Callable[[LoadedModel], list[str | None]] = _no_layer
    per_class: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    main_only: bool = False


# The report, part by part. Adding a method to the report is adding it to a part here.
PARTS = (
    Part("classify", "Top-5 classes", "What the network says the photo shows.", ("classify",), options={"topk": 5}),
    Part("summary", "Layers and receptive fields",
         "Each layer's output shape, parameters, kernel/stride/padding and receptive field: how many input "
         "pixels one cell of its output sees."),
    Part("activations", "Activation maps", "One forward pass, every conv stage.", ("activations",), main_only=True),
    Part("features", "Feature maps of three layers", "The most active channels of an early, a middle and a late stage.",
         ("features",), _three_stages, options={"max_channels": 32, "order": "activation"}),
    Part("filters", "First-layer filters", "What the first convolution looks for.", ("filters",)),
    Part("gradcam", "Grad-CAM and guided Grad-CAM", "For the {count} classes the network finds most probable{asked}.",
         ("gradcam", "guided-gradcam"), per_class=True, main_only=True),
    Part("occlusion", "Occlusion sensitivity", "A grey square slid over the photo (Zeiler & Fergus, Fig. 7).",
         ("occlusion",), _last_stage, options=OCCLUSION_OPTIONS),
    Part("deconv", "Deconvnet projections",
         "The strongest channels of three layers projected back to pixels (Zeiler & Fergus, Fig. 2).",
         ("deconv",), _later_stages, options={"top": DECONV_TOP}, main_only=True),
    Part("saliency", "Saliency and guided backprop", "Input gradients: which pixels the class score is most "
         "sensitive to.", ("saliency", "guided"), main_only=True),
)


def parts() -> tuple[Part, ...]:
    """``PARTS``, then a section for each other registry row that asks to be in the report."""
    shown = {name for part in PARTS for name in part.methods}
    extra = [get_method(name) for name in list_methods()]
    return PARTS + tuple(Part(spec.name, spec.title, spec.summary, (spec.name,))
                         for spec in extra if spec.in_report and spec.name not in shown)


def _classes(prediction: Prediction, target: int | str | None) -> list[int | str]:
    """The asked class, then the most probable ones, three in all."""
    classes: list[int | str] = [] if target is None else [target]
    for index in prediction.indices.tolist():
        if len(classes) >= 3:
            break
        if int(index) not in classes:
            classes.append(int(index))
    return classes


def _left_out(name: str, layer: str | None, cls: int | str | None, per_class: bool, error: ConvscopeError) -> str:
    """The note for a run that could not be made: which run, and the error's own line."""
    where = "".join([f" at {layer}" if layer else "", f" for class {cls}" if per_class and cls is not None else ""])
    return f"{get_method(name).title}{where} left out of the report: {error}"


def explore(
    loaded: LoadedModel,
    batch: torch.Tensor,
    *,
    image: str = "image",
    target: int | str | None = None,
    progress: Progress | None = None,
) -> Exploration:
    """The report's ``PARTS`` on one image (``(1, C, H, W)`` normalised batch).

    A run that raises a ``ConvscopeError`` is left out with a note (``Section.notes`` and the
    returned ``warnings``); classification's error is raised.

    Raises:
        ConvscopeError: from classification (bad target...).
    """
    from convscope.methods.summary import summary

    timings: dict[str, float] = {}
    grading: dict[str, tuple[int, float]] = {}
    random_aucs: RandomCache = {}
    warnings: list[str] = []
    sections: list[Section] = []
    prediction: Prediction | None = None
    model_summary: ModelSummary | None = None
    for part in parts():
        if progress is not None:
            progress(part.key)
        started = time.perf_counter()
        graded_seconds = 0.0
        classes = _classes(prediction, target) if part.per_class and prediction is not None else [target]
        intro = part.intro if not part.per_class else part.intro.format(
            count=len(classes), asked=" (the asked class first)" if target is not None else "")
        section = Section(part.key, part.title, intro)
        if part.key == "summary":
            model_summary = summary(loaded)
        for cls in classes:
            for layer in part.layers(loaded):
                for name in part.methods:
                    spec = get_method(name)
                    try:
                        result = spec.run(loaded, batch, target=cls, layer=layer, options=part.options)
                        views = spec.resolve_renderer()(result, context_for(loaded, batch, spec=spec))
                        views, seconds = graded_views(loaded, batch, result, views, random_aucs)
                        if "faithfulness" in views.record:
                            count, total = grading.get(name, (0, 0.0))
                            grading[name] = (count + 1, total + seconds)
                            graded_seconds += seconds
                    except ConvscopeError as error:
                        if name == "classify":
                            raise
                        note = _left_out(name, layer, cls, part.per_class, error)
                        section.notes.append(note)
                        warnings.append(note)
                        continue
                    warnings.extend(w for w in views.record.get("warnings", []) if w not in warnings)
                    section.views += list(views.views)[: 1 if part.main_only else None]
                    if name == "classify":
                        prediction = result[0]
        section.seconds = timings[part.key] = time.perf_counter() - started - graded_seconds
        sections.append(section)
    assert prediction is not None and model_summary is not None
    return Exploration(
        image=image, model=loaded.name, weights=loaded.weights, prediction=prediction,
        summary=model_summary, sections=sections, timings=timings, warnings=warnings, grading=grading,
    )
