"""CLI commands for the gradient methods: ``gradcam``, ``guided``, ``saliency``, ``deconv``.

Each command batches the readable images (bad files get one error line and the rest go on),
calls the library, turns the result into pictures and writes them through ``OutputDir``.
Method warnings (activations a backward rule could not be applied to) go to stderr, one line each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from convscope.cli.app import app, expand_images, layer_record, open_model
from convscope.cli.errors import EXIT_USER_ERROR, print_error
from convscope.cli.options import (
    BatchSizeOpt,
    ClassOpt,
    DeviceOpt,
    ImagesArg,
    JsonOpt,
    LabelOpt,
    LayerOpt,
    ModelOpt,
    OutDirOpt,
    RawOpt,
    SeedOpt,
    WeightsOpt,
    class_target,
    plural,
)
from convscope.cli.output import OutputDir, safe_name
from convscope.cli.progress import progress_bar
from convscope.errors import BadArgument, ImageError

if TYPE_CHECKING:
    from convscope.types import LoadedModel

VARIANTS = ("gradcam", "gradcam++", "guided", "scorecam")
# How input-space maps are displayed, recorded in the JSON next to the files.
SIGNED_DISPLAY = "signed: zero is mid-grey; scaled per image by the 99.5th percentile of |value|, clipped beyond"
MAGNITUDE_DISPLAY = "magnitude: 0 .. the 99.5th percentile of the map, clipped beyond"


def _warn(lines: tuple[str, ...], seen: set[str]) -> None:
    for line in lines:
        if line not in seen:  # once per run, not once per batch
            seen.add(line)
            typer.echo(f"warning: {line}", err=True)


def _batches(
    paths: list[Path], size: int, counter: list[int], preprocess: Any
) -> Iterator[tuple[list[Path], list[Any]]]:
    """Yield ``(paths, tensors)`` of up to ``size`` readable images, each decoded at reduced size
    and made a ``(1, C, H, W)`` input for ``preprocess`` at once (a batch costs its input tensors,
    whatever the photos' pixel counts); unreadable ones are reported and counted in ``counter[0]``."""
    pending: tuple[list[Path], list[Any]] = ([], [])
    for path in paths:
        try:
            image = preprocess.to_tensor(preprocess.load_image(path))
        except ImageError as exc:
            counter[0] += 1
            print_error(exc)
            continue
        pending[0].append(path)
        pending[1].append(image)
        if len(pending[0]) >= size:
            yield pending
            pending = ([], [])
    if pending[0]:
        yield pending


def _run_batched(
    paths: list[Path], loaded: LoadedModel, batch_size: int, description: str,
    job: Callable[[list[Path], Any], None],
) -> int:
    """``job(paths, batch)`` over batches of the readable images of ``expand_images``; return how many
    files failed."""
    import torch

    failures = [0]
    with progress_bar(len(paths), description, unit="img") as advance:
        for chunk, pictures in _batches(paths, batch_size, failures, loaded.preprocess):
            batch = torch.cat(pictures).to(loaded.device)
            job(chunk, batch)
            advance(len(chunk))
    return failures[0]


def _finish(out: OutputDir, command: str, options: dict[str, Any], records: list[dict[str, Any]],
            json_out: bool, failures: int) -> None:
    out.json(f"{command}.json", records)
    out.manifest(command, options)
    if json_out:
        typer.echo(json.dumps(records, indent=2))
    else:
        typer.echo(f"wrote {plural(len(out.written), 'file')} to {out.root}")
    if failures:
        raise typer.Exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------- pictures


def _photo(loaded: LoadedModel, batch: Any, index: int) -> np.ndarray:
    from convscope.render.pictures import display_image

    return display_image(loaded.preprocess, batch, index)


def _describe(path: Path, label: str, target: int, score: float, probability: float | None = None) -> str:
    shown = f"p = {probability:.3f}" if probability is not None else f"score {score:.3f}"
    return f"{path}: explaining {label} (class {target}, {shown})"


def _probabilities(loaded: LoadedModel, batch: Any, targets: Any) -> list[float]:
    """Softmax probability of each image's explained class, for captions and JSON (one extra
    forward pass; the gradient methods only keep the logit)."""
    from convscope.methods.predict import classify

    predictions = classify(loaded, batch, topk=len(loaded.categories) or 1)
    out = []
    for prediction, target in zip(predictions, targets.tolist(), strict=True):
        found = (prediction.indices == int(target)).nonzero()
        out.append(float(prediction.probabilities[int(found[0, 0])]) if len(found) else float("nan"))
    return out


# ---------------------------------------------------------------- commands


@app.command("gradcam")
def gradcam_command(
    images: ImagesArg,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_index: ClassOpt = None,
    label: LabelOpt = None,
    layer: LayerOpt = None,
    variant: Annotated[
        str, typer.Option("--variant", help="gradcam, gradcam++, guided (guided backprop x Grad-CAM) or scorecam.")
    ] = "gradcam",
    batch_size: BatchSizeOpt = 16,
    json_out: JsonOpt = False,
    raw: RawOpt = False,
) -> None:
    """Grad-CAM: where in the photo the evidence for a class is, at a conv layer (default: the last).

    Writes <image>_gradcam.png (the map in jet over the photo, 0.6/0.4) and
    <image>_gradcam_map.png (the map alone; gradcampp for --variant gradcam++); --variant guided
    also writes the guided Grad-CAM picture <image>_guided_gradcam.png.

    Examples: convscope gradcam cat.jpg -o out/ | convscope gradcam cat.jpg --label "tiger cat" --layer stage6 |
    convscope gradcam photos/ -m vgg16 -w random --variant gradcam++
    """
    from convscope.methods.gradcam import gradcam, gradcam_plus_plus, guided_gradcam
    from convscope.render.colormaps import colorize
    from convscope.render.overlay import overlay
    from convscope.render.pictures import cam_figure, gradient_figure, signed_picture

    if variant not in VARIANTS:
        raise BadArgument(f"--variant {variant}", "must be one of " + ", ".join(VARIANTS))
    target = class_target(class_index, label)
    paths = expand_images(images)
    out = OutputDir(output, inputs=paths)
    loaded = open_model(model, weights, seed, device)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    name = "gradcampp" if variant == "gradcam++" else "gradcam"  # guided: the Grad-CAM it used
    if variant == "scorecam":
        name = "scorecam"

    def job(paths: list[Path], batch: Any) -> None:
        if variant == "guided":
            guided = guided_gradcam(loaded, batch, target=target, layer=layer)
            assert guided.cam is not None
            cam, warnings = guided.cam, guided.warnings
        else:
            method = gradcam if variant == "gradcam" else gradcam_plus_plus
            if variant == "scorecam":
                from convscope.methods.scorecam import scorecam as method
            cam, warnings = method(loaded, batch, target=target, layer=layer), ()
        _warn(warnings, seen)
        probabilities = _probabilities(loaded, batch, cam.targets)
        for i, path in enumerate(paths):
            stem = out.stem(path)
            photo, p = _photo(loaded, batch, i), probabilities[i]
            if raw:
                pictures = [overlay(photo, cam.maps[i]), colorize(cam.maps[i])]
            else:
                pictures = [cam_figure(photo, cam, i, loaded, p), cam_figure(None, cam, i, loaded, p)]
            files = [out.png(f"{stem}_{name}.png", pictures[0], source=path),
                     out.png(f"{stem}_{name}_map.png", pictures[1], source=path)]
            if variant == "guided":
                guided_picture = signed_picture(guided.attributions[i]) if raw else gradient_figure(guided, i, loaded, p)
                files.append(out.png(f"{stem}_guided_gradcam.png", guided_picture, source=path))
            record = {
                "image": str(path), **layer_record(loaded, cam.layer), "class": int(cam.targets[i]),
                "label": cam.labels[i], "score": float(cam.scores[i]), "probability": p,
                "files": [f.name for f in files], "warnings": list(warnings),
            }
            if variant == "guided":
                record["display"] = SIGNED_DISPLAY
            records.append(record)
            if not json_out:
                typer.echo(_describe(path, cam.labels[i], int(cam.targets[i]), float(cam.scores[i]), p))

    failures = _run_batched(paths, loaded, batch_size, variant, job)
    options = {"model": loaded.name, "weights": loaded.weights, "variant": variant,
               **layer_record(loaded, layer or loaded.cam_layer), "target": target}
    _finish(out, "gradcam", options, records, json_out, failures)


def _input_gradient_command(
    command: str, images: list[Path], output: Path, model: str | None, weights: str | None,
    seed: int, device: str, class_index: int | None, label: str | None, batch_size: int, json_out: bool,
    raw: bool = False,
) -> None:
    from convscope.methods.guided import guided_backprop, saliency
    from convscope.render.pictures import (
        gradient_figure,
        gradient_magnitude_figure,
        magnitude_picture,
        signed_picture,
    )

    target = class_target(class_index, label)
    paths = expand_images(images)
    out = OutputDir(output, inputs=paths)
    loaded = open_model(model, weights, seed, device)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()

    def job(paths: list[Path], batch: Any) -> None:
        method = guided_backprop if command == "guided" else saliency
        result = method(loaded, batch, target=target)
        _warn(result.warnings, seen)
        probabilities = _probabilities(loaded, batch, result.targets)
        for i, path in enumerate(paths):
            stem, p = out.stem(path), probabilities[i]
            if raw:
                main = signed_picture(result.attributions[i]) if command == "guided" else magnitude_picture(result.maps[i])
                magnitude = _heat(loaded, batch, i, result.maps[i])
            else:
                main = gradient_figure(result, i, loaded, p)
                magnitude = gradient_magnitude_figure(_photo(loaded, batch, i), result, i, loaded, p)
            files = [out.png(f"{stem}_{command}.png", main, source=path),
                     out.png(f"{stem}_{command}_magnitude.png", magnitude, source=path)]
            records.append({
                "image": str(path), "class": int(result.targets[i]), "label": result.labels[i],
                "score": float(result.scores[i]), "probability": p, "files": [f.name for f in files],
                "display": SIGNED_DISPLAY if command == "guided" else MAGNITUDE_DISPLAY,
                "warnings": list(result.warnings),
            })
            if not json_out:
                typer.echo(_describe(path, result.labels[i], int(result.targets[i]), float(result.scores[i]), p))

    failures = _run_batched(paths, loaded, batch_size, command, job)
    options = {"model": loaded.name, "weights": loaded.weights, "target": target}
    _finish(out, command, options, records, json_out, failures)


def _heat(loaded: LoadedModel, batch: Any, index: int, values: Any) -> np.ndarray:
    from convscope.render.colormaps import percentile_scale
    from convscope.render.overlay import overlay

    return overlay(_photo(loaded, batch, index), percentile_scale(values, 0.0, 99.5))


@app.command("guided")
def guided_command(
    images: ImagesArg,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_index: ClassOpt = None,
    label: LabelOpt = None,
    batch_size: BatchSizeOpt = 16,
    json_out: JsonOpt = False,
    raw: RawOpt = False,
) -> None:
    """Guided backprop: the input gradient with only positive signals passed back through each ReLU.

    Writes <image>_guided.png (signed, grey = 0) and <image>_guided_magnitude.png (largest
    |gradient| over colours, in jet over the photo). Activations without a rule (SiLU, GELU...)
    are named in a warning.

    Examples: convscope guided cat.jpg -o out/ | convscope guided cat.jpg --class 281 --model vgg16 --weights random
    """
    _input_gradient_command("guided", images, output, model, weights, seed, device, class_index, label,
                            batch_size, json_out, raw)


@app.command("saliency")
def saliency_command(
    images: ImagesArg,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_index: ClassOpt = None,
    label: LabelOpt = None,
    batch_size: BatchSizeOpt = 16,
    json_out: JsonOpt = False,
    raw: RawOpt = False,
) -> None:
    """Saliency (Simonyan et al.): the largest |gradient of the class score| over colours, per pixel.

    Writes <image>_saliency.png (grey) and <image>_saliency_magnitude.png (in jet over the photo).

    Examples: convscope saliency cat.jpg -o out/ | convscope saliency photos/ --label espresso
    """
    _input_gradient_command("saliency", images, output, model, weights, seed, device, class_index, label,
                            batch_size, json_out, raw)


@app.command("deconv")
def deconv_command(
    images: ImagesArg,
    layer: LayerOpt = None,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    channel: Annotated[
        list[int] | None, typer.Option("--channel", help="Feature map(s) to project; repeat for several "
                                          "(default: the --top strongest in each image).")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many of the strongest channels.")] = 9,
    location: Annotated[
        str, typer.Option("--location", help="max: only the channel's strongest activation (as in the paper); "
                          "all: its whole feature map.")
    ] = "max",
    batch_size: BatchSizeOpt = 8,
    json_out: JsonOpt = False,
    raw: RawOpt = False,
) -> None:
    """Deconvnet (Zeiler & Fergus): project a layer's strongest activations back to pixels.

    For each projection writes <image>_<layer>_ch<C>.png (full size, grey = 0) and
    <image>_<layer>_ch<C>_crop.png (the projection cropped to the receptive field, next to the
    image patch under it); <image>_<layer>_deconv.png shows all of them in one grid.

    Examples: convscope deconv cat.jpg --layer conv5 -m alexnet -w random -o out/ |
    convscope deconv cat.jpg --layer stage4 --channel 7 --channel 12 --location all
    """
    from convscope.methods.deconvnet import deconv
    from convscope.render.grids import strip, tile, upscale
    from convscope.render.pictures import deconv_figure, projection_figure, signed_picture

    if not layer:
        raise BadArgument("--layer", "is required: name a layer alias or module path (see 'convscope layers')")
    paths = expand_images(images)
    out = OutputDir(output, inputs=paths)
    loaded = open_model(model, weights, seed, device)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    layer_file = safe_name(layer)
    chosen = list(channel) if channel else None

    def job(paths: list[Path], batch: Any) -> None:
        result = deconv(loaded, batch, layer, channel=chosen, top=top, location=location)
        _warn(result.warnings, seen)
        if not result.boxes_exact:
            _warn((f"receptive field of {layer} passes residual or functional ops: crops follow the main path",), seen)
        for i, path in enumerate(paths):
            stem = out.stem(path)
            photo = _photo(loaded, batch, i)
            pairs, captions, projections = [], [], []
            for k in range(result.channels.shape[1]):
                c = int(result.channels[i, k])
                top_, left, bottom, right = (int(v) for v in result.boxes[i, k])
                full = signed_picture(result.projections[i, k]) if raw else projection_figure(result, i, k, loaded)
                crop = signed_picture(result.projections[i, k, :, top_:bottom, left:right])
                patch = photo[top_:bottom, left:right]
                pair = strip([upscale(crop, 96), upscale(patch, 96)], ["projection", "patch"])
                files = [out.png(f"{stem}_{layer_file}_ch{c}.png", full, source=path),
                         out.png(f"{stem}_{layer_file}_ch{c}_crop.png", pair, source=path)]
                pairs.append(pair)
                captions.append(f"ch {c}: {float(result.values[i, k]):.3g}")
                projections.append({
                    "channel": c, "value": float(result.values[i, k]),
                    "position": [int(v) for v in result.positions[i, k]],
                    "box": [top_, left, bottom, right], "files": [f.name for f in files],
                })
            grid_picture = tile(pairs, labels=captions, min_side=1) if raw else deconv_figure(photo, result, i, loaded)
            grid = out.png(f"{stem}_{layer_file}_deconv.png", grid_picture, source=path)
            records.append({
                "image": str(path), **layer_record(loaded, layer), "location": location, "grid": grid.name,
                "display": SIGNED_DISPLAY,
                "projections": projections, "boxes_exact": result.boxes_exact,
                "warnings": list(result.warnings),
            })
            if not json_out:
                typer.echo(f"{path}: {plural(len(projections), 'projection')} of {layer} -> {grid.name}")

    failures = _run_batched(paths, loaded, batch_size, "deconv", job)
    options = {"model": loaded.name, "weights": loaded.weights, **layer_record(loaded, layer), "channel": chosen,
               "top": top, "location": location}
    _finish(out, "deconv", options, records, json_out, failures)


@app.command("explain")
def explain_command(
    images: ImagesArg,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_index: ClassOpt = None,
    label: LabelOpt = None,
    layer: LayerOpt = None,
    deconv_layer: Annotated[
        str | None, typer.Option("--deconv-layer", help="Layer of the deconvnet projection "
                                 "(default: the middle conv stage).")
    ] = None,
    window: Annotated[int, typer.Option("--window", min=1, help="Occluding square side, pixels.")] = 32,
    stride: Annotated[int, typer.Option("--stride", min=1, help="Occluder step, pixels.")] = 16,
    json_out: JsonOpt = False,
) -> None:
    """One panel per image, like the papers' figures: the photo, the top-5 classes, Grad-CAM,
    guided Grad-CAM, the occlusion probability map and the most active feature's deconvnet
    projection, side by side.

    Writes <image>_explain.png and explain.json. --layer is the Grad-CAM layer (default: the
    last stage); the occlusion grid is coarser than the occlusion command's (32/16) to stay
    quick.

    Examples:
    convscope explain cat.jpg -o out/
    convscope explain cat.jpg --label "tiger cat" -m alexnet -w random
    """
    from convscope.methods.deconvnet import deconv
    from convscope.methods.gradcam import guided_gradcam
    from convscope.methods.occlusion import occlusion
    from convscope.methods.predict import classify
    from convscope.render.pictures import explain_panel

    target = class_target(class_index, label)
    paths = expand_images(images)
    out = OutputDir(output, inputs=paths)
    loaded = open_model(model, weights, seed, device)
    stages = list(loaded.stages)
    projected = deconv_layer or (stages[len(stages) // 2] if stages else loaded.cam_layer)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()

    def job(chunk: list[Path], batch: Any) -> None:
        prediction = classify(loaded, batch, topk=5)[0]
        guided = guided_gradcam(loaded, batch, target=target, layer=layer)
        assert guided.cam is not None
        _warn(guided.warnings, seen)
        occluded = occlusion(loaded, batch, guided.cam.targets, window=window, stride=stride, fill="grey")
        projections = deconv(loaded, batch, projected, top=1)
        _warn(projections.warnings, seen)
        path = chunk[0]
        panel = explain_panel(_photo(loaded, batch, 0), prediction, guided.cam, guided, occluded, projections,
                              model=loaded, image_name=path.name)
        written = out.png(f"{out.stem(path)}_explain.png", panel, source=path)
        cam = guided.cam
        records.append({
            "image": str(path), "file": written.name, "class": int(cam.targets[0]), "label": cam.labels[0],
            "probability": float(occluded.clean_probability[0]), "top5": prediction.as_dicts(),
            "gradcam": layer_record(loaded, cam.layer), "deconv": {
                **layer_record(loaded, projected), "channel": int(projections.channels[0, 0]),
                "value": float(projections.values[0, 0])},
            "occlusion": {"window": window, "stride": stride, "fill": "grey",
                          "lowest_probability": float(occluded.probability[0].min())},
            "display": {"guided_gradcam": SIGNED_DISPLAY, "deconv": SIGNED_DISPLAY},
        })
        if not json_out:
            typer.echo(f"{path}: explaining {cam.labels[0]} -> {written.name}")

    failures = _run_batched(paths, loaded, 1, "explain", job)
    options = {"model": loaded.name, "weights": loaded.weights, "target": target,
               "gradcam": layer_record(loaded, layer or loaded.cam_layer),
               "deconv": layer_record(loaded, projected), "window": window, "stride": stride}
    _finish(out, "explain", options, records, json_out, failures)
