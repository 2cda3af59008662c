"""Method results -> captioned pictures and a JSON record: what the report and the web app show.

Each ``*_views`` function is the renderer named by a row of ``convscope.methods.registry``: it
takes the method's result and a ``ViewContext`` (the photo as the network saw it, the model's
name and weights) and returns ``Views``: pictures, each with a one-sentence caption that says
what it shows and how to read it, and a JSON-ready record of the numbers behind them.

The pictures come from the public functions of ``render.pictures``, ``grids``, ``overlay`` and
``classmap``, so every surface (CLI, report, web) draws the same figures. Pure: no model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from convscope.render.classmap import class_map_picture, grid_to_image
from convscope.render.colormaps import colorize, percentile_scale
from convscope.render.grids import strip, tile, upscale
from convscope.render.overlay import overlay
from convscope.render.pictures import (
    activation_pictures,
    activation_strip,
    feature_grid,
    filter_grid,
    magnitude_picture,
    signed_picture,
)


@dataclass(frozen=True)
class ViewContext:
    """What a renderer may know besides the result.

    Attributes:
        photo: ``(H, W, 3)`` uint8, the network's view of the image (``None`` for filters).
        model: model name; ``weights`` where its weights came from.
        index: which image of the batch to draw.
    """

    photo: np.ndarray | None
    model: str = ""
    weights: str = ""
    index: int = 0

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")

    @property
    def model_note(self) -> str:
        note = f"{self.model}" + (" (random weights: the pictures show an untrained network)"
                                 if self.random_weights else "")
        return note


@dataclass(frozen=True)
class View:
    """One picture: ``key`` (file-name safe), ``title``, ``picture`` ``(H, W, 3)`` uint8, ``caption``."""

    key: str
    title: str
    picture: np.ndarray
    caption: str


@dataclass(frozen=True)
class Views:
    """The pictures of one method run, main picture first, and its JSON record."""

    views: tuple[View, ...]
    record: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str | None = None) -> View:
        """The view called ``key``, or the main one."""
        if not key:
            return self.views[0]
        for view in self.views:
            if view.key == key:
                return view
        raise KeyError(key)


def _pct(p: float) -> str:
    return f"{100.0 * p:.1f}%"


def _normalised(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return np.zeros_like(array) if high <= low else (array - low) / (high - low)


# ---------------------------------------------------------------- classify


def prediction_bars(prediction: Any, *, width: int = 520, row: int = 26) -> np.ndarray:
    """Top-k as horizontal bars with label and percentage: ``(k*row + 8, width, 3)`` uint8."""
    entries = prediction.as_dicts()
    canvas = Image.new("RGB", (width, row * len(entries) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    bar_left, bar_right = 200, width - 60
    for k, entry in enumerate(entries):
        y = 4 + k * row
        probability = float(entry["probability"])
        draw.text((4, y + 6), str(entry["label"])[:30], fill=(0, 0, 0))
        draw.rectangle((bar_left, y + 4, bar_right, y + row - 4), outline=(200, 200, 200))
        end = bar_left + round((bar_right - bar_left) * probability)
        if end > bar_left:
            draw.rectangle((bar_left, y + 4, end, y + row - 4), fill=(31, 119, 180))
        draw.text((bar_right + 6, y + 6), _pct(probability), fill=(0, 0, 0))
    return np.asarray(canvas)


def prediction_views(result: Any, context: ViewContext) -> Views:
    prediction = result[context.index]
    first = prediction.as_dicts()[0]
    caption = (f"The {len(prediction.labels)} most probable classes for {context.model_note}: "
               f"the longer the bar, the surer the network; here {first['label']} at {_pct(float(first['probability']))}.")
    return Views(
        (View("classes", "Top classes", prediction_bars(prediction), caption),),
        {"predictions": prediction.as_dicts()},
    )


# ---------------------------------------------------------------- activations, features, filters


def activation_views(result: Any, context: ViewContext) -> Views:
    assert context.photo is not None
    i = context.index
    views = [View(
        "strip", "Activation maps",
        activation_strip(context.photo, result, i),
        "The photo, then each conv stage's mean rectified activation in jet over it, from the first stage "
        "(left, edges and colours) to the last (right, object parts): red is where that stage responds most.",
    )]
    for name, picture in activation_pictures(context.photo, result, i).items():
        views.append(View(
            f"layer_{name}", f"Activation of {name}", picture,
            f"Mean activation of {name} over its channels, in jet over the photo: red where the layer responds "
            "most, blue where it is silent.",
        ))
    return Views(tuple(views), {"layers": list(result.layers)})


def feature_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    channels = [int(c) for c in result.channels.tolist()]
    caption = (f"{len(channels)} feature maps of {result.layer}, one grey tile per channel (number top-left): "
               "white is where that channel fires, each tile scaled to its own range.")
    return Views(
        (View("grid", f"Feature maps of {result.layer}", feature_grid(result, i), caption),),
        {"layer": result.layer, "channels": channels,
         "strength": [float(v) for v in result.strength[i].tolist()]},
    )


def filter_views(result: Any, context: ViewContext) -> Views:
    shape = tuple(int(v) for v in result.weights.shape)
    colour = "in colour" if shape[1] == 3 else "as the input channel each filter weighs most"
    caption = (f"The {shape[0]} kernels of {result.layer} ({shape[2]}x{shape[3]}), {colour}, each scaled to its "
               "own range: these are the patterns the first layer looks for (edges, colour blobs).")
    return Views(
        (View("grid", f"Filters of {result.layer}", filter_grid(result), caption),),
        {"layer": result.layer, "shape": list(shape)},
    )


# ---------------------------------------------------------------- gradient methods


def _target_text(label: str, target: int, score: float) -> str:
    return f"{label} (class {target}, logit {score:.2f})"


def cam_views(result: Any, context: ViewContext) -> Views:
    assert context.photo is not None
    i = context.index
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    name = {"gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}.get(result.method, "Grad-CAM")
    caption = (f"{name} for {_target_text(label, target, score)} at {result.layer}, in jet over the photo: "
               f"red marks the regions whose features raise the {label} score most, blue those that do not.")
    return Views(
        (
            View("overlay", name, overlay(context.photo, result.maps[i]), caption),
            View("map", f"{name} map", colorize(result.maps[i]),
                 f"The same {name} map alone (0 blue to 1 red, scaled per image)."),
        ),
        {"method": result.method, "layer": result.layer, "class": target, "label": label, "score": score,
         "warnings": list(result.warnings)},
    )


def guided_gradcam_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    assert result.cam is not None
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    caption = (f"Guided Grad-CAM for {_target_text(label, target, score)}: guided backprop times the Grad-CAM map of "
               f"{result.cam.layer}; grey is zero, the bright and dark strokes are the pixels that raise the score.")
    views = [View("guided_gradcam", "Guided Grad-CAM", signed_picture(result.attributions[i]), caption)]
    if context.photo is not None:
        views.append(View(
            "gradcam", "Grad-CAM", overlay(context.photo, result.cam.maps[i]),
            f"The Grad-CAM map it used ({result.cam.layer}), in jet over the photo: red where the {label} evidence is.",
        ))
    return Views(tuple(views), {"method": "guided-gradcam", "layer": result.cam.layer, "class": target,
                                "label": label, "score": score, "warnings": list(result.warnings)})


def _heat(photo: np.ndarray, values: Any) -> np.ndarray:
    return overlay(photo, percentile_scale(values, 0.0, 99.5))


def guided_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    views = [View(
        "guided", "Guided backprop", signed_picture(result.attributions[i]),
        f"Guided backprop for {_target_text(label, target, score)}: grey is zero; bright and dark strokes are the "
        "edges and textures whose pixels raise the score (clipped at the 99.5th percentile).",
    )]
    if context.photo is not None:
        views.append(View("magnitude", "Guided backprop magnitude", _heat(context.photo, result.maps[i]),
                          "Its largest |value| over colours in jet over the photo: red where the pixels matter most."))
    return Views(tuple(views), {"method": "guided", "class": target, "label": label, "score": score,
                                "warnings": list(result.warnings)})


def saliency_views(result: Any, context: ViewContext) -> Views:
    i = context.index
    label, target, score = result.labels[i], int(result.targets[i]), float(result.scores[i])
    views = []
    if context.photo is not None:
        views.append(View(
            "overlay", "Saliency", _heat(context.photo, result.maps[i]),
            f"Saliency for {_target_text(label, target, score)}: the largest |gradient| over colours in jet over the "
            "photo; red pixels change the score most when nudged (clipped at the 99.5th percentile).",
        ))
    views.append(View("map", "Saliency map", magnitude_picture(result.maps[i]),
                      "The same gradient magnitude in grey: white pixels are the ones the score is most sensitive to."))
    return Views(tuple(views), {"method": "saliency", "class": target, "label": label, "score": score,
                                "warnings": list(result.warnings)})


def deconv_views(result: Any, context: ViewContext) -> Views:
    assert context.photo is not None
    i = context.index
    pairs, labels, rows = [], [], []
    for k in range(result.channels.shape[1]):
        c = int(result.channels[i, k])
        top, left, bottom, right = (int(v) for v in result.boxes[i, k])
        crop = signed_picture(result.projections[i, k, :, top:bottom, left:right])
        patch = context.photo[top:bottom, left:right]
        pairs.append(strip([upscale(crop, 96), upscale(patch, 96)], ["projection", "patch"]))
        value = float(result.values[i, k])
        labels.append(f"ch {c}: {value:.3g}")
        rows.append({"channel": c, "value": value, "position": [int(v) for v in result.positions[i, k]],
                     "box": [top, left, bottom, right]})
    where = "strongest activation" if result.location == "max" else "whole feature map"
    caption = (f"Deconvnet projections of the {len(pairs)} strongest channels of {result.layer}: for each, the "
               f"{where} projected back to pixels (left, grey = 0) next to the photo patch it sees (right); "
               "the strokes show which pattern in the patch the channel responds to.")
    views = [View("grid", f"Deconvnet of {result.layer}", tile(pairs, labels=labels, min_side=1), caption)]
    if pairs:
        views.append(View(
            "full", f"Deconvnet of {result.layer}, channel {rows[0]['channel']}",
            signed_picture(result.projections[i, 0]),
            f"The projection of channel {rows[0]['channel']} at full size: where in the image its pattern lies.",
        ))
    return Views(tuple(views), {"layer": result.layer, "location": result.location, "projections": rows,
                                "boxes_exact": bool(result.boxes_exact), "warnings": list(result.warnings)})


# ---------------------------------------------------------------- occlusion


def occlusion_views(result: Any, context: ViewContext) -> Views:
    assert context.photo is not None
    i = context.index
    photo = context.photo
    size = photo.shape[:2]
    origins = (result.row_origins, result.col_origins)
    label, target = result.labels[i], int(result.targets[i])
    clean = float(result.clean_probability[i])
    lowest = float(result.probability[i].min())
    square = f"a {result.window}px square moved in steps of {result.stride}px"
    probability = grid_to_image(result.probability[i], origins, result.window, size)
    views = [
        View("probability", "Probability under occlusion", overlay(photo, _normalised(probability)),
             f"The probability of {label} with {square} centred on each spot (from {_pct(clean)} unoccluded down to "
             f"{_pct(lowest)}), in jet over the photo: blue spots are where hiding the image hurts the class most."),
        View("classes", "Most probable class under occlusion",
             class_map_picture(result.top_class[i], result.class_names, origins, result.window, size,
                               photo=photo, highlight=target),
             f"The class the network picks with the square at each spot, one colour per class (legend, * = {label}): "
             "where the colour changes, the square hid what the decision rests on."),
        View("drop", "Probability drop per pixel", overlay(photo, _normalised(result.pixel_drop[i].clamp_min(0))),
             f"Each pixel's mean drop in {label} probability over the squares covering it (captum's occlusion map): "
             "red pixels carry the evidence."),
    ]
    record: dict[str, Any] = {
        "class": target, "label": label, "clean_probability": clean, "lowest_probability": lowest,
        "grid": [len(result.row_origins), len(result.col_origins)], "window": result.window,
        "stride": result.stride, "mode": result.stats.mode, "work_fraction": round(result.stats.work_fraction, 4),
    }
    if result.activation is not None and result.channels is not None:
        channel = int(result.channels[i])
        activation = grid_to_image(result.activation[i], origins, result.window, size)
        views.append(View(
            "activation", f"Activation of {result.layer} channel {channel} under occlusion",
            overlay(photo, _normalised(activation)),
            f"The total activation of feature map {channel} of {result.layer} (its strongest on this photo) with the "
            "square at each spot: blue where hiding the image silences the feature, so that is what it detects.",
        ))
        record.update({"layer": result.layer, "channel": channel})
    return Views(tuple(views), record)


def png_bytes(picture: np.ndarray) -> bytes:
    """Encode a ``(H, W, 3)`` uint8 picture as PNG."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG")
    return buffer.getvalue()
