"""Method results -> finished pictures (uint8 RGB arrays). Pure; no files, no models.

The words: a *picture* is a bare ``(H, W, 3)`` uint8 array (``activation_pictures``,
``feature_grid``, ``signed_picture``...; what ``--raw`` writes and the web app shows); a *figure*
is a picture with its caption and colour bar drawn around it by ``convscope.render.figures``
(``*_figure``; what the CLI writes by default and ``result.to_image()`` returns). These are the
drawing helpers of the method renderers in ``convscope.render.views``, which pick and caption
them; nothing else calls them for a method's result.

Display conventions (stated in each figure's caption):

* signed input-space maps (guided backprop, guided Grad-CAM, deconvnet projections): zero is
  mid-grey, each image is scaled by the 99.5th percentile of ``|value|`` over its pixels and
  colours and clipped there (one stray pixel does not wash the rest out);
* magnitude maps (saliency): 0 .. the 99.5th percentile, clipped, in ``hot``;
* activation / Grad-CAM overlays: jet over the photo, 0.6 photo + 0.4 colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from convscope.render.colormaps import as_array, colorize, percentile_scale, to_rgb_uint8
from convscope.render.figures import (
    MIN_SIDE,
    Bar,
    Line,
    caption_lines,
    enlarge,
    figure,
    font,
    labelled_grid,
    line_height,
    model_info,
    pad_height,
    side_by_side,
    stack,
    text_block,
    text_width,
    titled,
)
from convscope.render.grids import feature_tiles, filter_tiles, strip, tile
from convscope.render.overlay import overlay

CLIP_PERCENTILE = 99.5
SIGNED_NOTE = (f"signed: grey = 0, scaled per image to the {CLIP_PERCENTILE:g}th percentile of |value| "
               "(clipped beyond)")
GREY_RAMP = ((0, 0, 0), (255, 255, 255))
# How input-space maps are displayed, recorded in the CLI's JSON next to the files.
SIGNED_DISPLAY = "signed: zero is mid-grey; scaled per image by the 99.5th percentile of |value|, clipped beyond"
MAGNITUDE_DISPLAY = "magnitude: 0 .. the 99.5th percentile of the map, clipped beyond"


def display_image(preprocess: Any, batch: Any, index: int = 0) -> np.ndarray:
    """The network's view of image ``index`` of a normalised batch, as ``(H, W, 3)`` uint8."""
    return to_rgb_uint8(preprocess.to_display(batch[index : index + 1])[0])


def photo_for(image: Any, model: Any = None, index: int = 0, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """Whatever a notebook user has at hand -> the ``(H, W, 3)`` uint8 photo a map is drawn on.

    ``image``: ``None``; a uint8 array; a normalised ``(N, C, H, W)`` batch (needs ``model`` for
    its preprocessing); or a PIL image (preprocessed like the model's input, else resized to
    ``size``).
    """
    if image is None:
        return None
    if isinstance(image, np.ndarray):
        return image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    if hasattr(image, "dim") and model is not None:
        return display_image(model.preprocess, image if image.dim() == 4 else image[None], index)
    from PIL import Image

    if isinstance(image, Image.Image):
        if model is not None:
            return display_image(model.preprocess, model.preprocess.to_tensor(image), 0)
        picture = image.convert("RGB")
        if size is not None:
            picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(picture)
    raise TypeError(f"cannot draw on a {type(image).__name__}; give a PIL image, a uint8 array or the input batch")


# ---------------------------------------------------------------- bare pictures (--raw)


def activation_pictures(photo: np.ndarray, result: Any, index: int = 0) -> dict[str, np.ndarray]:
    """One overlay (0.6 photo + 0.4 jet map) per layer for image ``index``."""
    return {name: overlay(photo, result.maps[name][index]) for name in result.layers}


def feature_grid(result: Any, index: int = 0, columns: int | None = None) -> np.ndarray:
    """The selected channels of image ``index`` as grayscale tiles captioned with the channel index."""
    tiles, labels = feature_tiles(result.maps[index], result.channels.tolist())
    return tile(tiles, labels=labels, columns=columns)


def filter_grid(result: Any, columns: int | None = None) -> np.ndarray:
    """Each filter as a tile (RGB for first layers), captioned with its index."""
    tiles = filter_tiles(result.normalized, result.strongest_input.tolist())
    return tile(tiles, labels=[str(i) for i in range(len(tiles))], columns=columns, min_side=32)


def signed_scale(attribution: Any, percentile: float = CLIP_PERCENTILE) -> float:
    """The value shown as black/white: the ``percentile`` of ``|a|`` (its maximum if that is 0)."""
    array = np.abs(as_array(attribution))
    if not array.size:
        return 0.0
    return float(np.percentile(array, percentile)) or float(array.max())


def signed_picture(attribution: Any, scale: float | None = None) -> np.ndarray:
    """``(C, H, W)`` signed attribution -> ``(H, W, 3)`` uint8: zero is mid-grey, and the
    99.5th percentile of ``|a|`` reaches black/white (how deconvnet and guided-backprop images
    are usually shown; one stray pixel does not wash the rest out)."""
    array = as_array(attribution)
    scale = signed_scale(array) if scale is None else scale
    if scale == 0.0:
        return to_rgb_uint8(np.full(array.shape, 0.5, np.float32))
    return to_rgb_uint8(np.clip(0.5 + array / (2.0 * scale), 0.0, 1.0))


def magnitude_picture(values: Any, cmap: str | None = None) -> np.ndarray:
    """``(H, W)`` non-negative map -> ``(H, W, 3)`` uint8, 0 .. 99.5th percentile (grey, or ``cmap``)."""
    scaled = percentile_scale(values, 0.0, CLIP_PERCENTILE)
    return colorize(scaled, cmap) if cmap else to_rgb_uint8(scaled)


def unit_scaled(values: Any) -> np.ndarray:
    """Min-max scale to ``[0, 1]`` (all zeros for a constant map)."""
    array = as_array(values)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    return np.zeros_like(array) if high <= low else (array - low) / (high - low)


def heat_picture(photo: np.ndarray, values: Any) -> np.ndarray:
    """A magnitude map, 0 .. its 99.5th percentile, in jet over the photo."""
    return overlay(photo, percentile_scale(values, 0.0, CLIP_PERCENTILE))


# ---------------------------------------------------------------- figures


def _range(values: Any) -> tuple[float, float]:
    array = as_array(values)
    return (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)


def activation_figure(photo: np.ndarray, result: Any, layer: str, index: int = 0, model: Any = None) -> np.ndarray:
    """One layer's activation overlay with its caption and the channel-mean's real range."""
    low, high = _range(result.raw[layer][index])
    lines = caption_lines(model=model, layer=layer, details=(
        ("mean over channels of the layer output, bilinear-upsampled, min-max scaled per image; "
        "jet over the photo (0.6 photo + 0.4 colour)"),))
    bar = Bar(low, high, "mean activation over channels")
    return figure(overlay(photo, result.maps[layer][index]), "Activation map", lines, bar)


def activation_strip(photo: np.ndarray, result: Any, index: int = 0, model: Any = None,
                     *, captioned: bool | None = None) -> np.ndarray:
    """The photo then every layer's overlay in one row; captioned (the default when ``model`` is
    given): each tile says its layer and value range, under a title naming the model."""
    pictures = activation_pictures(photo, result, index)
    tiles = [enlarge(photo, 224)] + [enlarge(p, 224) for p in pictures.values()]
    labels = ["input"] + [f"{name}: {_fmt_range(result.raw[name][index])}" for name in pictures]
    if not (model is not None if captioned is None else captioned):
        return strip([photo, *pictures.values()], ["input", *pictures.keys()])
    grid = labelled_grid(tiles, labels, columns=len(tiles), min_side=1)
    lines = caption_lines(model=model, details=(
        "jet from each layer's lowest (blue) to highest (red) channel-mean activation; ranges under the tiles",))
    return titled(grid, "Activation maps of every stage", lines)


def _fmt_range(values: Any) -> str:
    low, high = _range(values)
    return f"{low:.3g}..{high:.3g}"


def _ordered_by_activation(result: Any) -> bool:
    channels = result.channels.tolist()
    return channels != sorted(channels)


def feature_figure(result: Any, index: int = 0, model: Any = None, order: str | None = None,
                   columns: int | None = None) -> np.ndarray:
    """The channels of one layer as grayscale tiles, labels (index, and the mean activation when
    ordered by activation) under the tiles, titled with the layer and model."""
    tiles, _ = feature_tiles(result.maps[index], result.channels.tolist())
    by_activation = order == "activation" if order else _ordered_by_activation(result)
    channels = result.channels.tolist()
    if by_activation:
        labels = [f"#{c}: {float(v):.3g}" for c, v in zip(channels, result.strength[index].tolist(), strict=True)]
    else:
        labels = [f"#{c}" for c in channels]
    grid = labelled_grid(tiles, labels, columns=columns, min_side=48)
    ordering = ("the most active channels first; under each: channel and mean activation" if by_activation
                else "channels in index order")
    lines = caption_lines(model=model, layer=result.layer, details=(
        f"{len(channels)} channels, {ordering}; each tile grey from 0 (or its minimum) to its own maximum",))
    return titled(grid, f"Feature maps of {result.layer}", lines)


def filter_figure(result: Any, model: Any = None, columns: int | None = None) -> np.ndarray:
    """Kernels as tiles enlarged nearest (a 3x3 kernel to 48 px), indices under the tiles."""
    tiles = filter_tiles(result.normalized, result.strongest_input.tolist())
    grid = labelled_grid(tiles, [str(i) for i in range(len(tiles))], columns=columns, min_side=48)
    out, inputs, kh, kw = result.weights.shape
    shown = "RGB kernels" if inputs == 3 else "each filter's strongest input channel (largest L2 norm), grey"
    lines = caption_lines(model=model, layer=result.layer, details=(
        f"{out} filters of {inputs}x{kh}x{kw}; {shown}; each filter min-max scaled on its own",))
    return titled(grid, f"Filters of {result.layer}", lines)


def cam_figure(photo: np.ndarray | None, cam: Any, index: int = 0, model: Any = None,
               probability: float | None = None, *, title: str = "Grad-CAM") -> np.ndarray:
    """A class activation map over the photo (or alone), captioned with class, layer and the raw
    range; ``title`` names the method (its registry row's title)."""
    picture = overlay(photo, cam.maps[index]) if photo is not None else colorize(cam.maps[index])
    low, high = _range(cam.raw[index])
    if cam.method == "scorecam":
        # Score-CAM takes no gradient: say what its weights are (the caption once spoke of gradients).
        weighted = ("ReLU of the channel sum, each channel weighted by the class logit of the photo masked by "
                    "that channel's map (softmax over channels)")
    else:
        weighted = "ReLU of the gradient-weighted channel sum"
    lines = caption_lines(model=model, layer=cam.layer, label=cam.labels[index], class_index=int(cam.targets[index]),
                          probability=probability, score=float(cam.scores[index]), details=(
        f"{weighted}, bilinear-upsampled, min-max scaled per image"
        + ("; jet over the photo (0.6 / 0.4)" if photo is not None else ""),))
    return figure(picture, title, lines, Bar(low, high, f"{title} value at the layer (before scaling)"))


def gradient_figure(result: Any, index: int = 0, model: Any = None, probability: float | None = None,
                    *, title: str) -> np.ndarray:
    """Input-space attribution as the literature shows it: signed maps grey-centred (guided
    backprop, guided Grad-CAM), saliency as a magnitude map; per-image 99.5th-percentile clip."""
    common: dict[str, Any] = {"model": model, "label": result.labels[index], "class_index": int(result.targets[index]),
                              "probability": probability, "score": float(result.scores[index])}
    layer = result.cam.layer if result.cam is not None else None
    if result.method == "saliency":
        high = float(np.percentile(as_array(result.maps[index]), CLIP_PERCENTILE))
        lines = caption_lines(**common, details=(
            f"largest |gradient| over colours; 0 .. {CLIP_PERCENTILE:g}th percentile, clipped",))
        return figure(magnitude_picture(result.maps[index], "hot"), title, lines,
                      Bar(0.0, high, "|d score / d pixel|", cmap="hot"))
    scale = signed_scale(result.attributions[index])
    lines = caption_lines(**common, layer=layer, details=(SIGNED_NOTE,))
    return figure(signed_picture(result.attributions[index], scale), title, lines,
                  Bar(-scale, scale, "gradient per colour channel", rgb=GREY_RAMP))


RELEVANCE_CMAP = "bwr"
RELEVANCE_DISPLAY = ("signed, summed over colours: white is zero, red for the class, blue against it; scaled per "
                     "image by the 99.5th percentile of |value|, clipped beyond")


def relevance_picture(values: Any, scale: float | None = None) -> np.ndarray:
    """``(H, W)`` signed map -> ``(H, W, 3)`` uint8 in blue-white-red: zero is white, the 99.5th
    percentile of ``|value|`` reaches full red (positive) or blue (negative). LRP, Integrated
    Gradients and SmoothGrad are shown this way (the heat maps of zennit and captum)."""
    array = as_array(values)
    scale = signed_scale(array) if scale is None else scale
    if scale == 0.0:
        return colorize(np.full(array.shape, 0.5, np.float32), RELEVANCE_CMAP)
    return colorize(np.clip(0.5 + array / (2.0 * scale), 0.0, 1.0), RELEVANCE_CMAP)


def relevance_figure(result: Any, index: int = 0, model: Any = None, probability: float | None = None,
                     *, title: str, details: Sequence[str] = ()) -> np.ndarray:
    """A signed attribution map summed over colours, zero-centred, with its real range."""
    scale = signed_scale(result.maps[index])
    lines = caption_lines(model=model, label=result.labels[index], class_index=int(result.targets[index]),
                          probability=probability, score=float(result.scores[index]), details=(
        *details, f"sum over colours; white = 0, clipped at the {CLIP_PERCENTILE:g}th percentile of |value|"))
    return figure(relevance_picture(result.maps[index], scale), title, lines,
                  Bar(-scale, scale, "attribution per pixel (red: for the class)", cmap=RELEVANCE_CMAP))


def relevance_overlay_figure(photo: np.ndarray, result: Any, index: int = 0, model: Any = None,
                             probability: float | None = None, *, title: str) -> np.ndarray:
    """The positive part of the map in jet over the photo: where the evidence for the class is."""
    positive = np.maximum(as_array(result.maps[index]), 0.0)
    high = float(np.percentile(positive, CLIP_PERCENTILE))
    lines = caption_lines(model=model, label=result.labels[index], class_index=int(result.targets[index]),
                          probability=probability, score=float(result.scores[index]), details=(
        f"positive part, 0 .. {CLIP_PERCENTILE:g}th percentile; jet over the photo",))
    return figure(heat_picture(photo, positive), f"{title} over the photo", lines, Bar(0.0, high, "attribution"))


def gradient_magnitude_figure(photo: np.ndarray, result: Any, index: int = 0, model: Any = None,
                              probability: float | None = None, *, title: str) -> np.ndarray:
    """The largest |attribution| over colours in jet over the photo, with its real range."""
    title += " magnitude"
    high = float(np.percentile(as_array(result.maps[index]), CLIP_PERCENTILE))
    lines = caption_lines(model=model, label=result.labels[index], class_index=int(result.targets[index]),
                          probability=probability, score=float(result.scores[index]), details=(
        f"largest |value| over colours, 0 .. {CLIP_PERCENTILE:g}th percentile; jet over the photo",))
    return figure(heat_picture(photo, result.maps[index]), title, lines, Bar(0.0, high, "|gradient|"))


def _square_crop(array: np.ndarray, box: Sequence[int] | np.ndarray, side: int) -> np.ndarray:
    """A ``side`` x ``side`` crop of ``(H, W, ...)`` centred on ``box``, shifted to stay inside."""
    top, left, bottom, right = (int(v) for v in box)
    height, width = array.shape[:2]
    side = min(side, height, width)
    y = min(max(0, (top + bottom) // 2 - side // 2), height - side)
    x = min(max(0, (left + right) // 2 - side // 2), width - side)
    return array[y : y + side, x : x + side]


def _fit(picture: np.ndarray, side: int) -> np.ndarray:
    """A square picture resized to ``side`` px: nearest when enlarging (crisp), bilinear when shrinking."""
    from PIL import Image

    method = Image.Resampling.NEAREST if picture.shape[0] <= side else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(picture)).resize((side, side), method))


def deconv_pairs(photo: np.ndarray, result: Any, index: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Per projection: the projection crop next to the photo patch, all the same square size."""
    boxes = as_array(result.boxes[index]).astype(np.int64)
    side = int(max(1, (boxes[:, 2] - boxes[:, 0]).max(), (boxes[:, 3] - boxes[:, 1]).max()))
    pairs, labels = [], []
    for k in range(result.channels.shape[1]):
        projection = signed_picture(result.projections[index, k])
        crop = enlarge(_square_crop(projection, boxes[k], side), 96)
        patch = enlarge(_square_crop(photo, boxes[k], side), 96)
        pairs.append(side_by_side([crop, patch], gap=2))
        labels.append(f"ch {int(result.channels[index, k])}: {float(result.values[index, k]):.3g}")
    return pairs, labels


def deconv_figure(photo: np.ndarray, result: Any, index: int = 0, model: Any = None) -> np.ndarray:
    """Zeiler & Fergus style grid: projection (left) and image patch (right) per feature map."""
    pairs, labels = deconv_pairs(photo, result, index)
    grid = labelled_grid(pairs, labels, columns=min(3, len(pairs)), min_side=1, gap=8)
    where = "each channel's strongest activation" if result.location == "max" else "each whole feature map"
    lines = caption_lines(model=model, layer=result.layer, details=(
        (f"{len(pairs)} feature maps, strongest first; projection of {where} (left) and the photo under its "
        "receptive field (right); label: channel and its largest activation"), SIGNED_NOTE))
    return titled(grid, f"Deconvnet projections of {result.layer}", lines)


def projection_figure(result: Any, index: int = 0, k: int = 0, model: Any = None) -> np.ndarray:
    """One full-size deconvnet projection, captioned."""
    scale = signed_scale(result.projections[index, k])
    channel = int(result.channels[index, k])
    lines = caption_lines(model=model, layer=result.layer, details=(
        f"channel {channel}, activation {float(result.values[index, k]):.3g}", SIGNED_NOTE))
    return figure(signed_picture(result.projections[index, k], scale), "Deconvnet projection", lines,
                  Bar(-scale, scale, "projected value per colour channel", rgb=GREY_RAMP))


def occlusion_figures(photo: np.ndarray, result: Any, index: int = 0, model: Any = None) -> dict[str, np.ndarray]:
    """``probability``, ``drop``, ``classes`` and (with a layer) ``activation`` figures of one image."""
    from convscope.render.classmap import class_map_picture, grid_to_image

    height, width = photo.shape[:2]
    origins = (result.row_origins, result.col_origins)
    setting = (f"grey square {result.window} px, stride {result.stride}; value at each pixel: mean over the "
               "square positions covering it")
    common: dict[str, Any] = {"model": model, "label": result.labels[index], "class_index": int(result.targets[index]),
                              "probability": float(result.clean_probability[index])}
    figures: dict[str, np.ndarray] = {}

    probability = grid_to_image(result.probability[index], origins, result.window, (height, width))
    low, high = _range(probability)
    figures["probability"] = figure(
        overlay(photo, _unit(probability, low, high)), "Occlusion: class probability",
        caption_lines(**common, details=(setting, "blue: hiding that spot lowers the probability")),
        Bar(low, high, "probability of the class with the square there"))

    drop = as_array(result.pixel_drop[index])
    extent = float(np.abs(drop).max()) or 1.0
    figures["drop"] = figure(
        overlay(photo, 0.5 + drop / (2.0 * extent), cmap="RdBu_r"), "Occlusion: probability drop",
        caption_lines(**common, details=(setting, "red: the probability falls; blue: it rises (zero-centred)")),
        Bar(-extent, extent, "clean probability minus occluded probability", cmap="RdBu_r"))

    # Enlarge the map, not the legend: class_map_picture draws at the size it is given.
    factor = max(1, -(-MIN_SIDE // max(1, min(height, width))))
    big_origins = (tuple(o * factor for o in origins[0]), tuple(o * factor for o in origins[1]))
    classes = class_map_picture(result.top_class[index], result.class_names, big_origins, result.window * factor,
                                (height * factor, width * factor), photo=enlarge(photo, MIN_SIDE),
                                highlight=int(result.targets[index]))
    figures["classes"] = figure(classes, "Occlusion: most probable class",
                                caption_lines(**common, details=(
                                    (f"grey square {result.window} px, stride {result.stride}; colour at each pixel: "
                                    "the most probable class with the square centred nearest; legend: share of "
                                    "positions; * marks the explained class"),)), min_side=1)

    if result.activation is not None and result.channels is not None:
        activation = grid_to_image(result.activation[index], origins, result.window, (height, width))
        low, high = _range(activation)
        figures["activation"] = figure(
            overlay(photo, _unit(activation, low, high)), "Occlusion: feature-map activation",
            caption_lines(model=model, layer=result.layer, details=(
                f"channel {int(result.channels[index])}: its total activation with the square there", setting)),
            Bar(low, high, "total activation of the channel"))
    return figures


def _unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


def prediction_picture(prediction: Any, *, width: int = 300, height: int | None = None) -> np.ndarray:
    """Top-k classes as horizontal bars with their probabilities."""
    from PIL import Image, ImageDraw

    face = font(12)
    row = line_height(face) + 14
    entries = prediction.as_dicts()
    height = height or 8 + row * len(entries)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = max(4, (height - row * len(entries)) // 2)
    for k, entry in enumerate(entries):
        y = top + k * row
        probability = float(entry["probability"])  # type: ignore[arg-type]
        label = str(entry["label"])
        text = f"{probability:6.1%}  {label}"
        while len(label) > 4 and draw.textlength(text, font=face) > width - 8:
            label = label[:-2]
            text = f"{probability:6.1%}  {label}…"
        draw.text((4, y), text, font=face, fill=(20, 20, 20))
        bar_y = y + line_height(face)
        draw.rectangle((4, bar_y, width - 5, bar_y + 8), fill=(230, 230, 230))
        draw.rectangle((4, bar_y, 4 + round(probability * (width - 9)), bar_y + 8), fill=(31, 119, 180))
    return np.asarray(canvas)


def prediction_figure(prediction: Any, model: Any = None) -> np.ndarray:
    """The top-k classes with probability bars, captioned with the model."""
    return titled(prediction_picture(prediction), f"Top-{len(prediction.labels)} classes",
                  caption_lines(model=model))


def summary_figure(result: Any) -> np.ndarray:
    """The summary table drawn in a monospace font."""
    from PIL import Image, ImageDraw

    from convscope.render.text import summary_table

    text = summary_table(result)
    face = font(12, mono=True)
    rows = text.splitlines()
    width = max(400, max(text_width(r, face) for r in rows) + 16)
    canvas = Image.new("RGB", (width, line_height(face) * len(rows) + 16), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, row in enumerate(rows):
        draw.text((8, 8 + k * line_height(face)), row, font=face, fill=(20, 20, 20))
    return titled(np.asarray(canvas), f"Summary of {result.model}")


def explain_panel(
    photo: np.ndarray,
    prediction: Any,
    cam: Any,
    guided: Any,
    occlusion_result: Any,
    projections: Any,
    *,
    model: Any = None,
    image_name: str = "",
    index: int = 0,
) -> np.ndarray:
    """One panel per image, in the style of the papers' figures: photo, top-5, Grad-CAM, guided
    Grad-CAM, occlusion probability map and the most active feature's deconvnet projection."""
    from convscope.render.classmap import grid_to_image

    cell = max(224, *photo.shape[:2])
    big = enlarge(photo, cell)
    side = big.shape[0]
    probabilities = dict(zip(prediction.indices.tolist(), prediction.probabilities.tolist(), strict=True))
    target = int(cam.targets[index])
    p = probabilities.get(target)

    def cell_of(picture: np.ndarray, title: str, note: str) -> tuple[np.ndarray, np.ndarray]:
        picture = enlarge(picture, side)
        return text_block(title, [Line(note)], picture.shape[1], title_size=13, size=11), picture

    height, width = photo.shape[:2]
    origins = (occlusion_result.row_origins, occlusion_result.col_origins)
    probability = grid_to_image(occlusion_result.probability[index], origins, occlusion_result.window, (height, width))
    low, high = _range(probability)
    k = 0
    box = as_array(projections.boxes[index, k]).astype(np.int64)
    proj_side = int(max(box[2] - box[0], box[3] - box[1], 1))
    projection = side_by_side([
        _fit(_square_crop(signed_picture(projections.projections[index, k]), box, proj_side), side // 2 - 1),
        _fit(_square_crop(photo, box, proj_side), side // 2 - 1)], gap=2)
    cells = [
        cell_of(photo, "(a) input", image_name or "the network's view"),
        cell_of(prediction_picture(prediction, width=side, height=side), "(b) top-5", "softmax probability"),
        cell_of(overlay(photo, cam.maps[index]), "(c) Grad-CAM", f"{cam.labels[index]}, {cam.layer}"),
        cell_of(signed_picture(guided.attributions[index]), "(d) guided Grad-CAM",
                f"grey = 0, {CLIP_PERCENTILE:g}th-pct clip"),
        cell_of(overlay(photo, _unit(probability, low, high)), "(e) occlusion",
                f"p = {low:.2f} (blue) .. {high:.2f} (red)"),
        cell_of(projection, "(f) deconvnet",
                f"{projections.layer}, channel {int(projections.channels[index, k])}: projection | patch"),
    ]
    header = max(h.shape[0] for h, _ in cells)  # equal headers keep the pictures on one line
    row = side_by_side([stack([pad_height(h, header), p], align="left") for h, p in cells], gap=10, margin=6)
    info = model_info(model)
    lines = caption_lines(model=model, label=cam.labels[index], class_index=target, probability=p,
                          score=float(cam.scores[index]), details=(
        (f"(c) Grad-CAM at {cam.layer}, jet over the photo; (e) grey square {occlusion_result.window} px, "
        f"stride {occlusion_result.stride}: probability of the class with the square centred there; "
        f"(f) Zeiler & Fergus projection of the most active feature map of {projections.layer}"),))
    title = f"What {info.name if info else 'the network'} sees" + (f" in {image_name}" if image_name else "")
    return titled(row, title, lines)
