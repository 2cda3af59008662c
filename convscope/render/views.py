"""One presentation per method: results -> views, for every surface.

Each ``*_views`` function is the renderer named by a row of ``convscope.methods.registry``:
``(result, ViewContext) -> Views``. It is the only drawing code for its method; the CLI (files,
JSON records, stdout lines), the notebook (``result.to_image()``), the HTML report and the web
app all consume what it returns.

The words: a *picture* is a bare ``(H, W, 3)`` uint8 array; a *figure* is a picture with its
caption and colour bar drawn around it (``render.figures``); a *view* is one ``View``: the
picture, its figure, a title and a caption sentence, and the file suffix the CLI writes it under.
``Views`` holds the views of one image with the JSON record of the numbers behind them.

The pictures and figures come from ``render.pictures``, ``grids``, ``overlay`` and ``classmap``.
Pure: no model runs, nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property, partial
from typing import Any

import numpy as np

from convscope.render.classmap import class_map_picture, grid_to_image
from convscope.render.colormaps import colorize
from convscope.render.figures import ModelInfo, png_bytes
from convscope.render.grids import strip, tile, upscale
from convscope.render.overlay import overlay
from convscope.render.pictures import (
    MAGNITUDE_DISPLAY,
    RELEVANCE_DISPLAY,
    SIGNED_DISPLAY,
    activation_figure,
    activation_pictures,
    activation_strip,
    cam_figure,
    deconv_figure,
    feature_figure,
    feature_grid,
    filter_figure,
    filter_grid,
    gradient_figure,
    gradient_magnitude_figure,
    heat_picture,
    magnitude_picture,
    occlusion_figures,
    photo_for,
    prediction_figure,
    prediction_picture,
    projection_figure,
    relevance_figure,
    relevance_overlay_figure,
    relevance_picture,
    signed_picture,
    unit_scaled,
)

__all__ = ["View", "ViewContext", "Views", "png_bytes", "render"]


@dataclass(frozen=True)
class ViewContext:
    """What a renderer may know besides the result.

    Attributes:
        photo: ``(H, W, 3)`` uint8, the network's view of the image (``None``: none at hand).
        model: model name; ``weights`` where its weights came from.
        index: which image of the batch to draw.
        loaded: the ``LoadedModel`` (names the network, its weights and layer aliases in captions).
        title: the method's title, from its registry row.
        method: the registry row's name.
        probability: the explained class's softmax probability (gradient methods know only logits).
        layer: the layer as the user named it; ``options`` the method's typed options.
        image: the input as the user named it (``<image>:`` on the CLI's stdout lines).
        file_names: the CLI's rule from a view's suffix to a file name in the output folder.
        pictures: ``False`` when the caller uses only the record, the line and the warnings (a
            CLI command without an output folder): renderers that honour it draw nothing.
    """

    photo: np.ndarray | None
    model: str = ""
    weights: str = ""
    index: int = 0
    loaded: Any = None
    title: str = ""
    method: str = ""
    probability: float | None = None
    layer: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    image: str = ""
    file_names: Callable[[str], str] | None = None
    pictures: bool = True

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")

    @property
    def model_note(self) -> str:
        return f"{self.model}" + (" (random weights: the pictures show an untrained network)"
                                  if self.random_weights else "")

    @property
    def captioned_model(self) -> Any:
        """What figures name in their caption: the loaded model, else its name and weights."""
        if self.loaded is not None:
            return self.loaded
        return ModelInfo(self.model, self.weights or "as given") if self.model else None

    def file(self, suffix: str) -> str:
        """The file a view with ``suffix`` is written to."""
        return self.file_names(suffix) if self.file_names is not None else f"{suffix}.png"

    def layer_record(self, name: str) -> dict[str, Any]:
        """A layer as every JSON of a run records it: the friendly name and its module path, and
        for a model convscope did not build, its measured layout and how it was read as NCHW
        (``{"layout": "NHWC", "converted": "permute(0, 3, 1, 2)"}``)."""
        stages = dict(getattr(self.loaded, "stages", {}) or {})
        path = stages.get(name, name)
        alias = next((a for a, target in stages.items() if target == path), path)
        record: dict[str, Any] = {"layer": alias, "module": path}
        if self.loaded is not None and getattr(self.loaded, "spec", None) is None:
            from convscope.probes.layout import cached_layout

            layout = cached_layout(self.loaded.module, path)  # measured by the method; never runs here
            if layout is not None:
                record.update(layout.record())
        return record

    def ground(self, size: tuple[int, int]) -> np.ndarray:
        """The photo, or a neutral grey of ``size`` where there is none (maps stay readable)."""
        return self.photo if self.photo is not None else np.full((*size, 3), 128, np.uint8)


@dataclass(frozen=True, eq=False)
class View:
    """One picture of a method run.

    Attributes:
        key: file-name safe name (the web app's ``view`` field).
        title: a few words for headings; ``caption`` one sentence on how to read the picture.
        picture: ``(H, W, 3)`` uint8, the bare picture (the web app, the report, ``--raw``).
        draw: makes the figure (the picture captioned, with a colour bar); drawn on first use.
        suffix: the CLI's file name after the image's stem (``gradcam_map``); ``None``: the
            default ``<method>_<key>``.
    """

    key: str
    title: str
    picture: np.ndarray
    caption: str = ""
    draw: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    suffix: str | None = None

    @cached_property
    def figure(self) -> np.ndarray:
        """``(H, W, 3)`` uint8, the picture with its caption and colour bar (the picture itself
        where it needs none)."""
        return self.draw() if self.draw is not None else self.picture


@dataclass(frozen=True)
class Views:
    """The views of one image of a method run and its JSON record.

    Attributes:
        views: what the web app and the report show, the main view first.
        record: the numbers behind the views: the CLI's record per image, without the image, and
            with ``"files": None`` where the CLI lists the files it wrote (at the end if absent).
        files: what the CLI writes, in order; ``None``: ``views``.
        main: key of the view ``result.to_image()`` returns; ``None``: the first of ``views``.
        line: the CLI's stdout for this image; ``None``: ``<image>: N pictures -> files``;
            ``""``: nothing.
        warnings: lines for the CLI's stderr (once per run).
        lists_files: the CLI adds the files it wrote to the record (not when the record names
            them itself).
    """

    views: tuple[View, ...]
    record: dict[str, Any] = field(default_factory=dict)
    files: tuple[View, ...] | None = None
    main: str | None = None
    line: str | None = None
    warnings: tuple[str, ...] = ()
    lists_files: bool = True

    def get(self, key: str | None = None) -> View:
        """The view called ``key``, or the main one."""
        if not key:
            return self.views[0]
        for view in self.views:
            if view.key == key:
                return view
        raise KeyError(key)

    @property
    def written(self) -> tuple[View, ...]:
        """The views the CLI writes, in order."""
        return self.views if self.files is None else self.files

    @property
    def figure(self) -> np.ndarray:
        """The main figure (``result.to_image()``)."""
        if self.main is None:
            return self.views[0].figure
        return next(v for v in (*self.views, *self.written) if v.key == self.main).figure


def render(spec: Any, result: Any, image: Any = None, *, model: Any = None, index: int = 0,
           probability: float | None = None) -> Views:
    """``spec``'s renderer on ``result``, with whatever a notebook user has at hand.

    Args:
        spec: the method's registry row.
        image: the photo to draw maps on (PIL image, uint8 array or the normalised input batch);
            without it, maps are drawn alone or on grey. A PIL image or a batch goes through the
            preprocessing of the model (``model``, else the one the result recorded as
            ``preprocess``), so the map lies on the crop the model saw.
        model: the ``LoadedModel`` (names the network and its weights in the captions).
    """
    seen = getattr(result, "preprocess", None)
    photo = photo_for(image, model if model is not None or seen is None else _Seen(seen), index, _input_size(result))
    context = ViewContext(photo, model=str(getattr(model, "name", "")), weights=str(getattr(model, "weights", "")),
                          index=index, loaded=model, title=spec.title, method=spec.name, probability=probability)
    return spec.resolve_renderer()(result, context)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Seen:
    """The preprocessing a result recorded, where ``photo_for`` takes a model."""

    preprocess: Any


def _input_size(result: Any) -> tuple[int, int] | None:
    for name in ("pixel_drop", "projections", "maps", "attributions"):
        values = getattr(result, name, None)
        if isinstance(values, dict):
            values = next(iter(values.values()), None)
        if values is not None and hasattr(values, "shape") and len(values.shape) >= 3:
            return int(values.shape[-2]), int(values.shape[-1])
    return None


def _pct(p: float) -> str:
    return f"{100.0 * p:.1f}%"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun if count == 1 else noun + 's'}"


def _target_text(label: str, target: int, score: float) -> str:
    return f"{label} (class {target}, logit {score:.2f})"


def _explaining(context: ViewContext, label: str, target: int, score: float) -> str:
    p = context.probability
    shown = f"p = {p:.3f}" if p is not None else f"score {score:.3f}"
    return f"{context.image}: explaining {label} (class {target}, {shown})"


# ---------------------------------------------------------------- classify


def prediction_views(result: Any, context: ViewContext) -> Views:
    from convscope.render.text import predictions_table

    prediction = result[context.index]
    record, line = {"predictions": prediction.as_dicts()}, predictions_table(context.image, prediction)
    if not context.pictures:  # classify on the CLI: the bar chart was 10% of the run, never written
        return Views((), record, files=(), line=line)
    first = prediction.as_dicts()[0]
    caption = (f"The {len(prediction.labels)} most probable classes for {context.model_note}: "
               f"the longer the bar, the surer the network; here {first['label']} at {_pct(float(first['probability']))}.")
    view = View("classes", "Top classes", prediction_picture(prediction, width=520), caption,
                partial(prediction_figure, prediction, context.captioned_model))
    return Views((view,), record, files=(), line=line)


# ---------------------------------------------------------------- activations, features, filters


def activation_views(result: Any, context: ViewContext) -> Views:
    i, model = context.index, context.captioned_model
    photo = context.ground(_input_size(result) or (1, 1))
    layers = [
        View(f"layer_{name}", f"Activation of {name}", picture,
             f"Mean activation of {name} over its channels, in jet over the photo: red where the layer responds "
             "most, blue where it is silent.",
             partial(activation_figure, photo, result, name, i, model), suffix=name)
        for name, picture in activation_pictures(photo, result, i).items()
    ]
    main = View(
        "strip", "Activation maps", activation_strip(photo, result, i),
        "The photo, then each conv stage's mean rectified activation in jet over it, from the first stage "
        "(left, edges and colours) to the last (right, object parts): red is where that stage responds most.",
        partial(activation_strip, photo, result, i, model, captioned=True), suffix="activations",
    )
    return Views((main, *layers), {"layers": list(result.layers)}, files=(*layers, main), line="")


def feature_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    channels = [int(c) for c in result.channels.tolist()]
    caption = (f"{len(channels)} feature maps of {result.layer}, one grey tile per channel (number top-left): "
               "white is where that channel fires, each tile scaled to its own range.")
    view = View("grid", f"Feature maps of {result.layer}", feature_grid(result, i), caption,
                partial(feature_figure, result, i, context.captioned_model, context.options.get("order")),
                suffix=f"features_{result.layer}")
    return Views((view,), {"layer": result.layer, "channels": channels,
                           "strength": [float(v) for v in result.strength[i].tolist()]}, line="")


def filter_views(result: Any, context: ViewContext) -> Views:
    shape = tuple(int(v) for v in result.weights.shape)
    colour = "in colour" if shape[1] == 3 else "as the input channel each filter weighs most"
    caption = (f"The {shape[0]} kernels of {result.layer} ({shape[2]}x{shape[3]}), {colour}, each scaled to its "
               "own range: these are the patterns the first layer looks for (edges, colour blobs).")
    view = View("grid", f"Filters of {result.layer}", filter_grid(result), caption,
                partial(filter_figure, result, context.captioned_model), suffix=f"filters_{result.layer}")
    return Views((view,), {"layer": context.layer or result.layer, "module": result.layer, "shape": list(shape)},
                 line="")


# ---------------------------------------------------------------- class activation maps


def _cam_record(cam: Any, context: ViewContext, warnings: tuple[str, ...]) -> dict[str, Any]:
    i = context.index
    return {**context.layer_record(cam.layer), "class": int(cam.targets[i]), "label": cam.labels[i],
            "score": float(cam.scores[i]), "probability": context.probability, "files": None,
            "warnings": list(warnings)}


def _cam_pair(cam: Any, context: ViewContext, title: str, word: str) -> tuple[View | None, View]:
    """The map over the photo (``None`` without one) and the map alone."""
    i, model, p = context.index, context.captioned_model, context.probability
    label, target, score = cam.labels[i], int(cam.targets[i]), float(cam.scores[i])
    over = None
    if context.photo is not None:
        over = View("overlay", title, overlay(context.photo, cam.maps[i]),
                    f"{title} for {_target_text(label, target, score)} at {cam.layer}, in jet over the photo: red "
                    f"marks the regions whose features raise the {label} score most, blue those that do not.",
                    partial(cam_figure, context.photo, cam, i, model, p, title=title), suffix=word)
    alone = View("map", f"{title} map", colorize(cam.maps[i]),
                 f"The same {title} map alone (0 blue to 1 red, scaled per image).",
                 partial(cam_figure, None, cam, i, model, p, title=title), suffix=f"{word}_map")
    return over, alone


def cam_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    title = context.title or result.method
    over, alone = _cam_pair(result, context, title, result.method)
    return Views(tuple(v for v in (over, alone) if v is not None), _cam_record(result, context, result.warnings),
                 line=_explaining(context, result.labels[i], int(result.targets[i]), float(result.scores[i])),
                 warnings=result.warnings)


def guided_gradcam_views(result: Any, context: ViewContext) -> Views:
    from convscope.methods.registry import get_method

    i, cam = context.index, result.cam
    assert cam is not None
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    caption = (f"Guided Grad-CAM for {_target_text(label, target, score)}: guided backprop times the Grad-CAM map of "
               f"{cam.layer}; grey is zero, the bright and dark strokes are the pixels that raise the score.")
    title = _rule_title(context.title or result.method, getattr(result, "rules", None))
    guided = View("guided_gradcam", title, signed_picture(result.attributions[i]), caption,
                  partial(gradient_figure, result, i, context.captioned_model, context.probability, title=title),
                  suffix="guided_gradcam")
    cam_title = get_method(cam.method).title
    over, alone = _cam_pair(cam, context, cam_title, cam.method)
    shown = [guided]
    if over is not None:
        shown.append(View("gradcam", cam_title, over.picture,
                          f"The Grad-CAM map it used ({cam.layer}), in jet over the photo: red where the {label} "
                          "evidence is.", over.draw, over.suffix))
    record = {**_cam_record(cam, context, result.warnings), "display": SIGNED_DISPLAY, **_rules_record(result)}
    return Views(tuple(shown), record, files=(*(v for v in (over, alone) if v is not None), guided),
                 line=_explaining(context, label, target, score), warnings=result.warnings)


# ---------------------------------------------------------------- input gradients


def _rule_title(title: str, rules: Any) -> str:
    """The method's title, saying so when its rectifier rule reached no rectifier."""
    return f"{title} (no rectifier: plain gradient)" if rules is not None and not rules.applied else title


def _rules_record(result: Any) -> dict[str, Any]:
    """``{"rules": ...}`` for a rule-based result (see ``probes.relu_rules.RuleReport.record``)."""
    rules = getattr(result, "rules", None)
    return {"rules": rules.record()} if rules is not None else {}


def _gradient_views(result: Any, context: ViewContext, signed: bool) -> Views:
    i, model, p = context.index, context.captioned_model, context.probability
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    title = _rule_title(context.title or result.method, getattr(result, "rules", None))
    word = context.method or result.method
    if signed:
        main = View("guided", title, signed_picture(result.attributions[i]),
                    f"{title} for {_target_text(label, target, score)}: grey is zero; bright and dark strokes are the "
                    "edges and textures whose pixels raise the score (clipped at the 99.5th percentile).",
                    partial(gradient_figure, result, i, model, p, title=title), suffix=word)
    else:
        main = View("map", f"{title} map", magnitude_picture(result.maps[i]),
                    "The same gradient magnitude in grey: white pixels are the ones the score is most sensitive to.",
                    partial(gradient_figure, result, i, model, p, title=title), suffix=word)
    views = [main]
    if context.photo is not None:
        caption = ("Its largest |value| over colours in jet over the photo: red where the pixels matter most."
                   if signed else
                   f"{title} for {_target_text(label, target, score)}: the largest |gradient| over colours in jet over "
                   "the photo; red pixels change the score most when nudged (clipped at the 99.5th percentile).")
        views.append(View("magnitude" if signed else "overlay", f"{title} magnitude" if signed else title,
                          heat_picture(context.photo, result.maps[i]), caption,
                          partial(gradient_magnitude_figure, context.photo, result, i, model, p, title=title),
                          suffix=f"{word}_magnitude"))
    record = {"class": target, "label": label, "score": score, "probability": p, "files": None,
              "display": SIGNED_DISPLAY if signed else MAGNITUDE_DISPLAY, **_rules_record(result),
              "warnings": list(result.warnings)}
    return Views(tuple(views if signed else reversed(views)), record, files=tuple(views), main=main.key,
                 line=_explaining(context, label, target, score), warnings=result.warnings)


def guided_views(result: Any, context: ViewContext) -> Views:
    return _gradient_views(result, context, signed=True)


def saliency_views(result: Any, context: ViewContext) -> Views:
    return _gradient_views(result, context, signed=False)


def _attribution_details(result: Any, index: int) -> tuple[str, ...]:
    """Caption lines of a relevance or path method: its settings, IG's completeness error."""
    settings = getattr(result, "settings", {}) or {}
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if isinstance(v, (str, int, float)))
    lines = [shown] if shown else []
    if result.method == "lrp":
        total, score = float(result.attributions[index].sum()), float(result.scores[index])
        lines.append(f"input relevance sums to {total:.3g} of the logit {score:.3g} (biases and merged "
                     "BatchNorm shifts absorb the rest)")
    if result.completeness is not None:
        lines.append(f"completeness error {float(result.completeness[index]):+.3g} "
                     "(sum of attributions minus the score's change from the baseline)")
    return tuple(lines)


def attribution_views(result: Any, context: ViewContext) -> Views:
    """LRP, Integrated Gradients, SmoothGrad: the signed map summed over colours in blue-white-red
    (zero white), and its positive part over the photo."""
    i, model, p = context.index, context.captioned_model, context.probability
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    title = context.title or result.method
    word = context.method or result.method
    details = _attribution_details(result, i)
    main = View("map", title, relevance_picture(result.maps[i]),
                f"{title} for {_target_text(label, target, score)}: red pixels carry evidence for the class, blue "
                "against it, white none (summed over colours, clipped at the 99.5th percentile of |value|).",
                partial(relevance_figure, result, i, model, p, title=title, details=details), suffix=word)
    views = [main]
    if context.photo is not None:
        positive = result.maps[i].clamp(min=0)
        views.append(View("overlay", f"{title} over the photo", heat_picture(context.photo, positive),
                          "The evidence for the class (the positive part) in jet over the photo.",
                          partial(relevance_overlay_figure, context.photo, result, i, model, p, title=title),
                          suffix=f"{word}_overlay"))
    record: dict[str, Any] = {
        "class": target, "label": label, "score": score, "probability": p, "files": None,
        "display": RELEVANCE_DISPLAY, "settings": dict(result.settings),
        "sum": float(result.attributions[i].sum()),
        "completeness_error": None if result.completeness is None else float(result.completeness[i]),
        "uncovered": list(result.uncovered), "warnings": list(result.warnings),
    }
    return Views(tuple(views), record, files=tuple(views), main=main.key,
                 line=_explaining(context, label, target, score), warnings=result.warnings)


# ---------------------------------------------------------------- deconvnet


def deconv_views(result: Any, context: ViewContext) -> Views:
    i, model = context.index, context.captioned_model
    photo = context.ground(_input_size(result) or (1, 1))
    layer = result.layer
    heading = _rule_title(f"Deconvnet of {layer}", getattr(result, "rules", None))
    pairs, labels, rows, files = [], [], [], []
    for k in range(result.channels.shape[1]):
        c = int(result.channels[i, k])
        top, left, bottom, right = (int(v) for v in result.boxes[i, k])
        crop = signed_picture(result.projections[i, k, :, top:bottom, left:right])
        pair = strip([upscale(crop, 96), upscale(photo[top:bottom, left:right], 96)], ["projection", "patch"])
        full = View("full", f"Deconvnet of {layer}, channel {c}", signed_picture(result.projections[i, k]),
                    f"The projection of channel {c} at full size: where in the image its pattern lies.",
                    partial(projection_figure, result, i, k, model), suffix=f"{layer}_ch{c}")
        cropped = View(f"ch{c}_crop", f"Deconvnet of {layer}, channel {c}, cropped", pair, suffix=f"{layer}_ch{c}_crop")
        files += [full, cropped]
        pairs.append(pair)
        value = float(result.values[i, k])
        labels.append(f"ch {c}: {value:.3g}")
        rows.append({"channel": c, "value": value, "position": [int(v) for v in result.positions[i, k]],
                     "box": [top, left, bottom, right], "files": [context.file(v.suffix or "") for v in (full, cropped)]})
    where = "strongest activation" if result.location == "max" else "whole feature map"
    caption = (f"Deconvnet projections of the {len(pairs)} strongest channels of {layer}: for each, the "
               f"{where} projected back to pixels (left, grey = 0) next to the photo patch it sees (right); "
               "the strokes show which pattern in the patch the channel responds to.")
    grid = View("grid", heading, tile(pairs, labels=labels, min_side=1), caption,
                partial(deconv_figure, photo, result, i, model), suffix=f"{layer}_deconv")
    grid_file = context.file(grid.suffix or "")
    warnings = result.warnings
    if not result.boxes_exact:
        warnings += (f"receptive field of {layer} passes residual or functional ops: crops follow the main path",)
    record = {**context.layer_record(context.layer or layer), "location": result.location, "grid": grid_file,
              "display": SIGNED_DISPLAY, "projections": rows, "boxes_exact": bool(result.boxes_exact),
              **_rules_record(result), "warnings": list(result.warnings)}
    return Views((grid, *files[:1]), record, files=(*files, grid),
                 line=f"{context.image}: {_plural(len(rows), 'projection')} of {layer} -> {grid_file}",
                 warnings=warnings, lists_files=False)


# ---------------------------------------------------------------- occlusion


def occlusion_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    photo = context.ground(_input_size(result) or (1, 1))
    size = photo.shape[:2]
    origins = (result.row_origins, result.col_origins)
    label, target = result.labels[i], int(result.targets[i])
    clean = float(result.clean_probability[i])
    lowest = float(result.probability[i].min())
    square = f"a {result.window}px square moved in steps of {result.stride}px"
    figures = cache(partial(occlusion_figures, photo, result, i, context.captioned_model))

    def drawn(key: str) -> Callable[[], np.ndarray]:
        return lambda: figures()[key]

    probability = grid_to_image(result.probability[i], origins, result.window, size)
    views = {
        "probability": View(
            "probability", "Probability under occlusion", overlay(photo, unit_scaled(probability)),
            f"The probability of {label} with {square} centred on each spot (from {_pct(clean)} unoccluded down to "
            f"{_pct(lowest)}), in jet over the photo: blue spots are where hiding the image hurts the class most.",
            drawn("probability"), "occlusion_probability"),
        "classes": View(
            "classes", "Most probable class under occlusion",
            class_map_picture(result.top_class[i], result.class_names, origins, result.window, size,
                              photo=photo, highlight=target),
            f"The class the network picks with the square at each spot, one colour per class (legend, * = {label}): "
            "where the colour changes, the square hid what the decision rests on.", drawn("classes"),
            "occlusion_classes"),
        "drop": View(
            "drop", "Probability drop per pixel", overlay(photo, unit_scaled(result.pixel_drop[i].clamp_min(0))),
            f"Each pixel's mean drop in {label} probability over the squares covering it (captum's occlusion map): "
            "red pixels carry the evidence.", drawn("drop"), "occlusion_drop"),
    }
    shown = [views["probability"], views["classes"], views["drop"]]
    files = [views["probability"], views["drop"], views["classes"]]
    record: dict[str, Any] = {
        "class": target, "label": label, "clean_probability": clean, "lowest_probability": lowest,
        "grid": [len(result.row_origins), len(result.col_origins)], "window": result.window,
        "stride": result.stride, "fill": list(result.fill),
        "classes_shown": {result.class_names[c]: int((result.top_class[i] == c).sum())
                          for c in sorted(set(result.top_class[i].flatten().tolist()))},
        "mode": result.stats.mode, "work_fraction": round(result.stats.work_fraction, 4),
        "precision": result.stats.precision, "fallback": result.stats.fallback or None,
        "note": result.stats.note or None,
    }
    if result.activation is not None and result.channels is not None:
        channel = int(result.channels[i])
        activation = grid_to_image(result.activation[i], origins, result.window, size)
        over = View(
            "activation", f"Activation of {result.layer} channel {channel} under occlusion",
            overlay(photo, unit_scaled(activation)),
            f"The total activation of feature map {channel} of {result.layer} (its strongest on this photo) with the "
            "square at each spot: blue where hiding the image silences the feature, so that is what it detects.",
            drawn("activation"), "occlusion_activation")
        alone = View("activation_map", f"Activation of {result.layer} channel {channel}",
                     upscale(colorize(unit_scaled(result.activation[i])), 224), suffix="occlusion_activation_map")
        shown.append(over)
        files += [over, alone]
        clean_activation = result.clean_activation
        record.update({**context.layer_record(context.layer or result.layer), "channel": channel,
                       "clean_activation": float(clean_activation[i]) if clean_activation is not None else None})
        if result.layer_layout is not None:
            record.update(result.layer_layout)
    warnings: tuple[str, ...] = (f"--mode approximate: {result.stats.fallback}",) if result.stats.fallback else ()
    if result.stats.note:
        warnings += (f"note: {result.stats.note}",)
    return Views(tuple(shown), record, files=tuple(files), line="", warnings=warnings)
