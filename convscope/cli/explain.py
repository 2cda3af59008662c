"""The ``explain`` command: one panel per image, in the style of the papers' figures.

The method commands (``gradcam``, ``guided``, ``saliency``, ``deconv``...) are generated from the
method registry by ``convscope.cli.methods_cmd``, and their pictures come from each method's
renderer in ``convscope.render.views``; this command composes several methods in one panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from convscope.cli.batch import finish, photo_of, run_batched, warn_once
from convscope.cli.common import expand_images, layer_record, open_model
from convscope.cli.options import (
    ClassOpt,
    DeviceOpt,
    ImagesArg,
    JsonOpt,
    LabelOpt,
    LayerOpt,
    ModelOpt,
    OutDirOpt,
    OutputIndexOpt,
    SeedOpt,
    WeightsOpt,
    class_target,
)
from convscope.cli.output import OutputDir
from convscope.methods.registry import cli_choices

VARIANTS = cli_choices("gradcam", "--variant")


# ---------------------------------------------------------------- explain


def explain_command(
    images: ImagesArg,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
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
    from convscope.render.pictures import SIGNED_DISPLAY, explain_panel

    target = class_target(class_index, label)
    paths = expand_images(images)
    out = OutputDir(output, inputs=paths)
    loaded = open_model(model, weights, seed, device, output_index=output_index)
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
