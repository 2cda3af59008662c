"""The gradient methods on the command line: the writers of ``gradcam``, ``guided``, ``saliency``
and ``deconv`` (commands generated from the method registry by ``convscope.cli.methods_cmd``),
and the ``explain`` command (one panel per image).

The generated commands batch the readable images (bad files get one error line and the rest go
on) and call the library; the writers here turn each result into pictures, JSON records and
stdout lines. Method warnings (activations a backward rule could not be applied to) go to
stderr, one line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from convscope.cli.app import app, expand_images, layer_record, open_model
from convscope.cli.methods_cmd import MethodWriter, finish, photo_of, run_batched, warn_once
from convscope.cli.options import (
    ClassOpt,
    DeviceOpt,
    ImagesArg,
    JsonOpt,
    LabelOpt,
    LayerOpt,
    ModelOpt,
    OutDirOpt,
    SeedOpt,
    WeightsOpt,
    class_target,
    plural,
)
from convscope.cli.output import OutputDir, safe_name
from convscope.methods.registry import cli_choices

if TYPE_CHECKING:
    from convscope.types import LoadedModel

VARIANTS = cli_choices("gradcam", "--variant")
# How input-space maps are displayed, recorded in the JSON next to the files.
SIGNED_DISPLAY = "signed: zero is mid-grey; scaled per image by the 99.5th percentile of |value|, clipped beyond"
MAGNITUDE_DISPLAY = "magnitude: 0 .. the 99.5th percentile of the map, clipped beyond"


# ---------------------------------------------------------------- pictures


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


# ---------------------------------------------------------------- writers


class GradcamWriter(MethodWriter):
    """``<image>_<name>.png`` and ``<image>_<name>_map.png`` (name: gradcam, gradcampp, scorecam;
    ``--variant guided``: the Grad-CAM it used, plus ``<image>_guided_gradcam.png``)."""

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.colormaps import colorize
        from convscope.render.overlay import overlay
        from convscope.render.pictures import cam_figure, gradient_figure, signed_picture

        run, out, loaded = self.run, self.run.out, self.run.loaded
        assert out is not None
        variant = run.selected["--variant"]
        name = {"gradcam++": "gradcampp", "scorecam": "scorecam"}.get(variant, "gradcam")
        guided = result if variant == "guided" else None
        if guided is not None:
            assert guided.cam is not None
            cam, warnings = guided.cam, guided.warnings
        else:
            cam, warnings = result, ()
        run.warn(warnings)
        probabilities = _probabilities(loaded, batch, cam.targets)
        for i, path in enumerate(paths):
            stem = out.stem(path)
            photo, p = photo_of(loaded, batch, i), probabilities[i]
            if run.raw:
                pictures = [overlay(photo, cam.maps[i]), colorize(cam.maps[i])]
            else:
                pictures = [cam_figure(photo, cam, i, loaded, p), cam_figure(None, cam, i, loaded, p)]
            files = [out.png(f"{stem}_{name}.png", pictures[0], source=path),
                     out.png(f"{stem}_{name}_map.png", pictures[1], source=path)]
            if guided is not None:
                guided_picture = signed_picture(guided.attributions[i]) if run.raw else gradient_figure(guided, i, loaded, p)
                files.append(out.png(f"{stem}_guided_gradcam.png", guided_picture, source=path))
            record = {
                "image": str(path), **layer_record(loaded, cam.layer), "class": int(cam.targets[i]),
                "label": cam.labels[i], "score": float(cam.scores[i]), "probability": p,
                "files": [f.name for f in files], "warnings": list(warnings),
            }
            if guided is not None:
                record["display"] = SIGNED_DISPLAY
            run.records.append(record)
            if not run.json_out:
                typer.echo(_describe(path, cam.labels[i], int(cam.targets[i]), float(cam.scores[i]), p))

    def manifest(self) -> dict[str, Any]:
        run = self.run
        return {**run.basics, "variant": run.selected["--variant"],
                **layer_record(run.loaded, run.layer or run.loaded.cam_layer), "target": run.target}


class InputGradientWriter(MethodWriter):
    """``guided`` and ``saliency``: ``<image>_<command>.png`` and ``<image>_<command>_magnitude.png``."""

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.pictures import (
            gradient_figure,
            gradient_magnitude_figure,
            magnitude_picture,
            signed_picture,
        )

        run, out, loaded, command = self.run, self.run.out, self.run.loaded, self.run.command
        assert out is not None
        run.warn(result.warnings)
        probabilities = _probabilities(loaded, batch, result.targets)
        for i, path in enumerate(paths):
            stem, p = out.stem(path), probabilities[i]
            if run.raw:
                main = signed_picture(result.attributions[i]) if command == "guided" else magnitude_picture(result.maps[i])
                magnitude = _heat(loaded, batch, i, result.maps[i])
            else:
                main = gradient_figure(result, i, loaded, p)
                magnitude = gradient_magnitude_figure(photo_of(loaded, batch, i), result, i, loaded, p)
            files = [out.png(f"{stem}_{command}.png", main, source=path),
                     out.png(f"{stem}_{command}_magnitude.png", magnitude, source=path)]
            run.records.append({
                "image": str(path), "class": int(result.targets[i]), "label": result.labels[i],
                "score": float(result.scores[i]), "probability": p, "files": [f.name for f in files],
                "display": SIGNED_DISPLAY if command == "guided" else MAGNITUDE_DISPLAY,
                "warnings": list(result.warnings),
            })
            if not run.json_out:
                typer.echo(_describe(path, result.labels[i], int(result.targets[i]), float(result.scores[i]), p))

    def manifest(self) -> dict[str, Any]:
        return {**self.run.basics, "target": self.run.target}


def _heat(loaded: LoadedModel, batch: Any, index: int, values: Any) -> np.ndarray:
    from convscope.render.colormaps import percentile_scale
    from convscope.render.overlay import overlay

    return overlay(photo_of(loaded, batch, index), percentile_scale(values, 0.0, 99.5))


class DeconvWriter(MethodWriter):
    """Per projection ``<image>_<layer>_ch<C>.png`` and ``..._crop.png``; ``<image>_<layer>_deconv.png``
    shows all of them in one grid."""

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.grids import strip, tile, upscale
        from convscope.render.pictures import deconv_figure, projection_figure, signed_picture

        run, out, loaded, layer = self.run, self.run.out, self.run.loaded, self.run.layer
        assert out is not None
        location, layer_file = run.options["location"], safe_name(layer)
        run.warn(result.warnings)
        if not result.boxes_exact:
            run.warn((f"receptive field of {layer} passes residual or functional ops: crops follow the main path",))
        for i, path in enumerate(paths):
            stem = out.stem(path)
            photo = photo_of(loaded, batch, i)
            pairs, captions, projections = [], [], []
            for k in range(result.channels.shape[1]):
                c = int(result.channels[i, k])
                top_, left, bottom, right = (int(v) for v in result.boxes[i, k])
                full = signed_picture(result.projections[i, k]) if run.raw else projection_figure(result, i, k, loaded)
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
            grid_picture = tile(pairs, labels=captions, min_side=1) if run.raw else deconv_figure(photo, result, i, loaded)
            grid = out.png(f"{stem}_{layer_file}_deconv.png", grid_picture, source=path)
            run.records.append({
                "image": str(path), **layer_record(loaded, layer), "location": location, "grid": grid.name,
                "display": SIGNED_DISPLAY,
                "projections": projections, "boxes_exact": result.boxes_exact,
                "warnings": list(result.warnings),
            })
            if not run.json_out:
                typer.echo(f"{path}: {plural(len(projections), 'projection')} of {layer} -> {grid.name}")

    def manifest(self) -> dict[str, Any]:
        run = self.run
        return {**run.basics, **layer_record(run.loaded, run.layer), "channel": run.options["channel"],
                "top": run.options["top"], "location": run.options["location"]}


# ---------------------------------------------------------------- explain


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
        warn_once(guided.warnings, seen)
        occluded = occlusion(loaded, batch, guided.cam.targets, window=window, stride=stride, fill="grey")
        projections = deconv(loaded, batch, projected, top=1)
        warn_once(projections.warnings, seen)
        path = chunk[0]
        panel = explain_panel(photo_of(loaded, batch, 0), prediction, guided.cam, guided, occluded, projections,
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

    failures = run_batched(paths, loaded, 1, "explain", job)
    options = {"model": loaded.name, "weights": loaded.weights, "target": target,
               "gradcam": layer_record(loaded, layer or loaded.cam_layer),
               "deconv": layer_record(loaded, projected), "window": window, "stride": stride}
    finish(out, "explain", options, records, json_out, failures)
