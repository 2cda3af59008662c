"""CLI commands for the measurements: ``invariance``, ``correspondence``, ``quality``.

Each parses options, calls ``convscope.analysis``, hands the result to ``render.analysis`` and
writes a JSON record, text tables and PNG plots through ``OutputDir`` (``manifest.json`` last).
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from convscope.analysis.limits import MAX_AMOUNT, MAX_AMOUNTS, MAX_PARTS_BYTES, MAX_RANDOM
from convscope.cli.common import expand_images, load_good_images, open_model, split_layers
from convscope.cli.errors import EXIT_USER_ERROR
from convscope.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    ImagesArg,
    JsonOpt,
    LayerOpt,
    ModelOpt,
    OutDirOpt,
    OutputIndexOpt,
    SeedOpt,
    WeightsOpt,
)
from convscope.cli.output import OutputDir
from convscope.cli.progress import progress_bar
from convscope.errors import BadArgument, ImageError
from convscope.parsing import parse_class_index, parse_float, parse_int, shown

TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="Class index or label to track (default: each image's top-1 class)."),
]


def _target(value: str | None) -> int | str | None:
    """``--target``: a class index (ASCII digits) or a label name, ``None`` for each image's top-1."""
    return None if value is None else parse_class_index(value, subject="--target")


def _amount(text: str, option: str) -> float:
    return parse_float(text, subject=option, minimum=-MAX_AMOUNT, maximum=MAX_AMOUNT)


def _numbers(text: str, option: str) -> list[float]:
    """``"-60,-30,0,30"`` or ``"start:stop:step"`` (stop included when reached) -> at most
    ``MAX_AMOUNTS`` finite floats, counted before the list is made."""
    too_many = f"over the limit of {MAX_AMOUNTS} (use a larger step or a shorter range)"
    if ":" in text:
        fields = text.split(":")
        if len(fields) != 3:
            raise BadArgument(f"{option} {shown(text)}", "expected numbers like -60,-30,0 or start:stop:step")
        start, stop, step = (_amount(v, option) for v in fields)
        if step == 0 or (step > 0) != (stop >= start):
            raise BadArgument(f"{option} {shown(text)}", "never reaches its end")
        steps = (stop - start) / step + 1e-9
        if not steps < MAX_AMOUNTS:
            count = f"{math.floor(steps) + 1}" if steps < 1e16 else f"more than {MAX_AMOUNTS}"  # exact below 2**53
            raise BadArgument(f"{option} {shown(text)}", f"gives {count} amounts, {too_many}")
        return [round(start + i * step, 10) for i in range(math.floor(steps) + 1)]
    fields = [v for v in text.split(",") if v.strip()]
    if not fields:
        raise BadArgument(f"{option} {shown(text)}", "needs at least one amount")
    if len(fields) > MAX_AMOUNTS:
        raise BadArgument(f"{option} {shown(text)}", f"gives {len(fields)} amounts, {too_many}")
    return [_amount(v, option) for v in fields]


def _names(text: str, option: str, known: tuple[str, ...], old: dict[str, str] | None = None) -> list[str]:
    """A comma list of names from ``known`` (or ``old`` spellings of them): at least one, each known."""
    names = [(old or {}).get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    if not names:
        raise BadArgument(f"{option} {shown(text)}", f"names nothing (choose from {', '.join(known)})")
    for name in names:
        if name not in known:
            raise BadArgument(f"{option} {shown(name)}", "must be one of " + ", ".join(known))
    return names


def _read_parts(path: Path) -> Any:
    """The JSON of a ``--parts`` file: a regular file of at most ``MAX_PARTS_BYTES``, numbers finite."""
    subject = f"--parts {path}"
    limit = f"{MAX_PARTS_BYTES / 2**20:g} MiB"
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise BadArgument(subject, "is a directory, not a JSON file")
        if not stat.S_ISREG(info.st_mode):  # a device or a FIFO could be endless or block
            raise BadArgument(subject, "is not a regular file (a device, pipe or socket)")
        if info.st_size > MAX_PARTS_BYTES:
            raise BadArgument(subject, f"is {info.st_size / 2**20:.1f} MiB, over the {limit} limit of a parts file")
        with path.open("rb") as handle:
            data = handle.read(MAX_PARTS_BYTES + 1)  # the file may have grown since stat
    except OSError as exc:
        raise BadArgument(subject, (exc.strerror or "cannot be read").lower()) from None
    except ValueError:  # a NUL byte in the path
        raise BadArgument(subject, "is not a valid path") from None
    if len(data) > MAX_PARTS_BYTES:
        raise BadArgument(subject, f"is over the {limit} limit of a parts file")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise BadArgument(subject, f"box coordinates must be finite numbers, not {shown(text)}")
        return value

    def whole(text: str) -> int:
        return parse_int(text, subject=subject)

    def refuse(text: str) -> None:
        raise BadArgument(subject, f"box coordinates must be finite numbers, not {text}")

    try:
        return json.loads(data.decode("utf-8"), parse_float=finite, parse_int=whole, parse_constant=refuse)
    except UnicodeDecodeError:
        raise BadArgument(subject, "is not UTF-8 text") from None
    except RecursionError:
        raise BadArgument(subject, "is nested too deeply to be a parts file") from None
    except json.JSONDecodeError as exc:
        raise BadArgument(subject, f"is not valid JSON ({exc})") from None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _floats(values: Any) -> list[float | None]:
    return [_finite(float(v)) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _good_images(images: list[Path]) -> tuple[list[Path], list[Any], int]:
    paths = expand_images(images)
    good = list(load_good_images(paths))
    return [p for p, _ in good], [image for _, image in good], len(paths) - len(good)


def _finish(out: OutputDir, command: str, options: dict[str, Any], record: Any, text: str,
            json_out: bool, failures: int) -> None:
    out.manifest(command, options)
    typer.echo(json.dumps(record, indent=2) if json_out else text.rstrip("\n"))
    if not json_out:
        typer.echo(f"wrote {len(out.written)} files to {out.root}")
    if failures:
        raise typer.Exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------- invariance


# --layers is these commands' documented spelling; --layer/-l, the other commands' one, works too.
InvarianceLayersOpt = Annotated[
    list[str] | None,
    typer.Option("--layers", "--layer", "-l", help="Layer aliases or module paths; repeat or comma-separate "
                 "(default: the first conv stage and classifier_input, the input of the last Linear)."),
]
CorrespondenceLayersOpt = Annotated[
    list[str] | None,
    typer.Option("--layers", "--layer", "-l", help="Layer aliases or module paths; repeat or comma-separate "
                 "(default: the last conv stage and classifier_input)."),
]


def invariance_command(
    images: ImagesArg,
    transform: Annotated[str, typer.Option("--transform", help="translate (vertical), scale or rotate.")] = "translate",
    amounts: Annotated[
        str | None,
        typer.Option("--amounts", help="Comma list or start:stop:step (default: the paper's -60..60 px, "
                     f"1.0..1.8, 0..360 degrees); at most {MAX_AMOUNTS} amounts, each between {-MAX_AMOUNT:g} and "
                     f"{MAX_AMOUNT:g}. Use --amounts=-60,... for negative values."),
    ] = None,
    layers: InvarianceLayersOpt = None,
    target: TargetOpt = None,
    pad: Annotated[str, typer.Option("--pad", help="Uncovered border: mean (the image's mean colour) or reflect.")] = "mean",
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
    batch_size: BatchSizeOpt = 32,
    json_out: JsonOpt = False,
) -> None:
    """Invariance curves (Zeiler & Fergus Fig. 5): feature distance and class probability as the
    image is shifted, zoomed or rotated (before preprocessing).

    Writes invariance.json, invariance_<transform>.png (one curve per image) and
    invariance_<transform>_mean.png (mean with a ±1 std band).

    Examples: convscope invariance cat.jpg dog.jpg --transform rotate -o out/ |
    convscope invariance photos/ --transform translate --amounts=-60:60:10 --layers stem,classifier_input
    """
    given = _numbers(amounts, "--amounts") if amounts else None  # checked before torch is imported
    tracked = _target(target)
    from convscope.analysis.invariance import DEFAULT_AMOUNTS, invariance
    from convscope.render.analysis import invariance_figure, invariance_mean_figure

    chosen = given if given is not None else list(DEFAULT_AMOUNTS.get(transform, ()))
    loaded = open_model(model, weights, seed, device, output_index=output_index)
    paths, pictures, failures = _good_images(images)
    if not pictures:
        raise ImageError(", ".join(str(p) for p in images), "no readable images")
    with progress_bar(len(pictures) * len(chosen), "invariance", unit="copy") as advance:
        curves = invariance(loaded, pictures, transform, chosen, layers=split_layers(layers),
                            target=tracked, pad=pad, batch_size=batch_size, progress=advance)
    record = {
        "transform": curves.transform,
        "amounts": list(curves.amounts),
        "layers": list(curves.layers),
        "images": [
            {
                "image": str(path),
                "target": int(curves.targets[i]),
                "distance": {layer: _floats(curves.distance[layer][i]) for layer in curves.layers},
                "relative_distance": {layer: _floats(curves.relative_distance[layer][i]) for layer in curves.layers},
                "probability": _floats(curves.probability[i]),
                "top_class": [int(c) for c in curves.top_class[i]],
            }
            for i, path in enumerate(paths)
        ],
    }
    out = OutputDir(output)
    out.json("invariance.json", record)
    names = [p.name for p in paths]
    out.png(f"invariance_{curves.transform}.png", invariance_figure(curves, names))
    out.png(f"invariance_{curves.transform}_mean.png", invariance_mean_figure(curves))
    lines = [f"{p}: tracking {curves.labels[i]} (class {int(curves.targets[i])}); probability "
             f"{float(curves.probability[i].min()):.3f}..{float(curves.probability[i].max()):.3f}; top-1 kept at "
             f"{int((curves.top_class[i] == curves.targets[i]).sum())}/{len(curves.amounts)} amounts"
             for i, p in enumerate(paths)]
    options = {"model": loaded.name, "weights": loaded.weights, "transform": transform, "amounts": list(curves.amounts),
               "layers": list(curves.layers), "target": target, "pad": pad,
               "labels": {str(k): v for k, v in curves.class_names.items()}}
    _finish(out, "invariance", options, record, "\n".join(lines), json_out, failures)


# ---------------------------------------------------------------- correspondence


def correspondence_command(
    images: ImagesArg,
    parts: Annotated[Path, typer.Option("--parts", help="JSON: part name -> [top, left, bottom, right] in image "
                                        "pixels, one box per image, or {image file name: box}; a regular file "
                                        f"of at most {MAX_PARTS_BYTES // 2**20} MiB.")],
    layers: CorrespondenceLayersOpt = None,
    random: Annotated[int, typer.Option("--random", min=0, max=MAX_RANDOM,
                                        help=f"Random boxes for the control (0..{MAX_RANDOM}).")] = 10,
    window: Annotated[int, typer.Option("--window", min=0, help="0: the boxes as given; N: N x N squares "
                                        "centred on them.")] = 0,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
    batch_size: BatchSizeOpt = 32,
    json_out: JsonOpt = False,
) -> None:
    """Part correspondence (Zeiler & Fergus §4.3, Table 1): do covered parts change the features
    the same way across images? Lower mean feature sign change = more consistent.

    Writes correspondence.json, correspondence.txt (the table) and parts.png (the boxes).
    --seed also seeds the random boxes.

    Example: convscope correspondence faces/ --parts parts.json --random 10 -o out/
    """
    spec = _read_parts(parts)  # checked before torch is imported
    if not isinstance(spec, dict) or not spec:
        raise BadArgument(f"--parts {parts}", "must be a JSON object: part name -> box(es)")
    from convscope.analysis.correspondence import correspondence
    from convscope.render.analysis import correspondence_table, parts_picture

    loaded = open_model(model, weights, seed, device, output_index=output_index)
    given = expand_images(images)
    paths, pictures, failures = _good_images(images)
    kept = [given.index(p) for p in paths]
    for name, boxes in spec.items():  # per-image lists follow the images that could be read
        if isinstance(boxes, list) and len(boxes) == len(given) and boxes and isinstance(boxes[0], list):
            spec[name] = [boxes[i] for i in kept]
    names = [p.name for p in paths]
    sets = 1 + len(spec) + random
    with progress_bar(len(pictures) * sets, "correspondence", unit="img") as advance:
        result = correspondence(loaded, pictures, spec, layers=split_layers(layers), random=random, window=window,
                                names=names, seed=seed, batch_size=batch_size, progress=advance)
    table: dict[str, Any] = {}
    for layer in result.layers:
        row: dict[str, Any] = {
            part: {"delta": s.delta, "normalized": s.normalized, "std": s.std}
            for part, s in result.parts_delta[layer].items()
        }
        control = result.random[layer]
        row["random"] = {"mean": _finite(control.mean), "std": _finite(control.std),
                         "normalized": [d.normalized for d in control.draws], "delta": [d.delta for d in control.draws]}
        table[layer] = row
    record = {
        "images": [str(p) for p in paths],
        "layers": list(result.layers),
        "dimensions": result.dimensions,
        "pairs": result.count * (result.count - 1),
        "window": window,
        "boxes": {part: [list(b) for b in boxes] for part, boxes in result.boxes.items()},
        "random_boxes": [[list(b) for b in draw] for draw in result.random_boxes],
        "table": table,
    }
    text = correspondence_table(result)
    out = OutputDir(output)
    out.json("correspondence.json", record)
    out.text("correspondence.txt", text)
    out.png("parts.png", parts_picture([np.asarray(p.convert("RGB")) for p in pictures], result.boxes))
    options = {"model": loaded.name, "weights": loaded.weights, "parts": str(parts), "layers": list(result.layers),
               "random": random, "window": window, "seed": seed}
    _finish(out, "correspondence", options, record, text, json_out, failures)


# ---------------------------------------------------------------- quality

# Scored only when named: each map costs 25-50 forward and backward passes, at every step.
OPT_IN_METHODS = ("ig", "smoothgrad")


PROTOCOLS = ("rise", "quantus")


def quality_command(
    images: ImagesArg,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma list of attribution methods: any "
                                                "method that explains a class with a map (gradcam, gradcampp, "
                                                "guided-gradcam, guided, saliency, deconv, occlusion, scorecam, "
                                                "lrp, ig, smoothgrad...). Default: all of them but ig and "
                                                "smoothgrad (25-50 passes per map, at every randomisation "
                                                "step: name them to include them).")] = None,
    metrics: Annotated[str, typer.Option("--metrics", help="Comma list of deletion, insertion, randomization.")]
    = "deletion,insertion,randomization",
    randomization: Annotated[str, typer.Option("--randomization", help="Comma list of top-down, bottom-up "
                                               "(cascading) and independent (one layer at a time). Default: the "
                                               "two cascades; each mode costs one map per layer step.")]
    = "top-down,bottom-up",
    protocol: Annotated[str, typer.Option("--protocol", help="Deletion/insertion protocol: rise (RISE's "
                                          "evaluation, default) or quantus (Quantus' PixelFlipping and "
                                          "RegionPerturbation).")] = "rise",
    step: Annotated[int | None, typer.Option("--step", min=1, help="Pixels per deletion/insertion step "
                                             "(default: RISE's 224 at 224x224).")] = None,
    fill: Annotated[str, typer.Option("--fill", help="Deleted pixels' value in the normalised input, a finite "
                                      "number (0: the mean colour, RISE's default).")] = "0",
    layer: LayerOpt = None,
    target: TargetOpt = None,
    output: OutDirOpt = Path("convscope-out"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    output_index: OutputIndexOpt = None,
    batch_size: BatchSizeOpt = 64,
    json_out: JsonOpt = False,
) -> None:
    """Explanation quality: deletion/insertion AUCs against a random map and an edge detector,
    and the sanity checks of Adebayo et al. (model randomisation), for several methods on the
    same images.

    Randomisation re-initialises the layers on a copy of the model (top down, bottom up, or one
    at a time) and compares each method's absolute map with the original: Spearman rank
    correlation, SSIM and HOG similarity.

    Writes quality.json (with the "sanity" table: per method, mode and step, the mean and std
    over images of each similarity), quality.txt, quality_curves.png, randomization.png (the
    curves) and randomization_<image>_<mode>.png (Adebayo et al.'s Fig. 2: methods x
    randomisation steps). A method that does not beat the random map is flagged (* in the
    table, "flagged" in the JSON). --protocol quantus replaces RISE's deletion/insertion by
    Quantus' PixelFlipping and RegionPerturbation curves (the "faithfulness" record).

    Examples: convscope quality cat.jpg coffee.jpg -o out/ |
    convscope quality photos/ --methods gradcam,scorecam --metrics deletion,insertion --step 1792 |
    convscope quality cat.jpg --methods guided,saliency,gradcam --metrics randomization --randomization independent
    """
    if protocol not in PROTOCOLS:  # checked before torch is imported
        raise BadArgument(f"--protocol {shown(protocol)}", "must be one of " + ", ".join(PROTOCOLS))
    from convscope.analysis.quality import BASELINES, METRICS, beats_random, explanation_maps, quality
    from convscope.analysis.sanity import MODES, attribution_methods, method_aliases
    from convscope.render.analysis import (
        nanmean,
        quality_curves_figure,
        quality_table,
        quantus_table,
        randomization_figure,
        sanity_panel,
        sanity_table,
    )
    from convscope.render.pictures import display_image

    known = attribution_methods()
    chosen = (_names(methods, "--methods", known, method_aliases()) if methods is not None
              else [name for name in known if name not in OPT_IN_METHODS])
    wanted = _names(metrics, "--metrics", METRICS)
    modes = _names(randomization, "--randomization", MODES)
    quantus = protocol == "quantus"
    quantus_protocol = _quantus_protocol() if quantus else None
    deletion_fill = parse_float(fill, subject="--fill")
    explained = _target(target)
    loaded = open_model(model, weights, seed, device, output_index=output_index)
    paths, pictures, failures = _good_images(images)
    if not pictures:
        raise ImageError(", ".join(str(p) for p in images), "no readable images")
    batch = loaded.preprocess.to_tensor(pictures).to(loaded.device)
    causal = [m for m in wanted if m != "randomization"]
    rise = [] if quantus else causal
    run_metrics = [m for m in wanted if m == "randomization" or not quantus]
    settings = {"target": explained, "layer": layer, "step": step, "deletion_fill": deletion_fill, "seed": seed,
                "batch_size": batch_size, "randomization_modes": modes}
    results = {}
    faithfulness: dict[str, Any] | None = None
    units = (len(chosen) if run_metrics else 0) + (len(BASELINES) if rise else 0) + (1 if quantus and causal else 0)
    with progress_bar(units, "quality", unit="method") as advance:
        if run_metrics:
            for name in chosen:
                results[name] = quality(loaded, batch, name, run_metrics, **settings)  # type: ignore[arg-type]
                advance(1)
        baselines = {}
        for name in BASELINES if rise else ():
            baselines[name] = quality(loaded, batch, name, rise, **settings)  # type: ignore[arg-type]
            advance(1)
        if quantus_protocol is not None and causal:
            if results:  # the maps randomisation has computed already
                targets, maps = next(iter(results.values())).targets, {name: r.maps for name, r in results.items()}
            else:
                targets, maps = explanation_maps(loaded, batch, chosen, target=explained, layer=layer, seed=seed,
                                                 batch_size=batch_size)
            _, extra = explanation_maps(loaded, batch, list(BASELINES), target=targets, layer=layer, seed=seed,
                                        batch_size=batch_size)
            faithfulness = quantus_protocol(loaded, batch, {**maps, **extra}, targets,
                                            batch_size=batch_size).as_dict()
            advance(1)
    flags = {}
    for name, result in results.items():
        verdict = beats_random(result, baselines["random"]) if rise else {}
        flags[name] = [metric for metric, beaten in verdict.items() if not beaten]

    def scores(curves: Any) -> dict[str, Any]:
        auc = curves.auc.double()
        return {"mean": float(auc.mean()), "std": float(auc.std(unbiased=False)), "per_image": _floats(auc)}

    def entry(result: Any) -> dict[str, Any]:
        row: dict[str, Any] = {}
        if result.deletion is not None:
            row["deletion"] = scores(result.deletion)
        if result.insertion is not None:
            row["insertion"] = scores(result.insertion)
        cascade = result.randomization
        if cascade is not None:  # the first mode, in the compact form of earlier versions
            row["randomization"] = {
                "layers": list(cascade.layers),
                "modules": [list(m) for m in cascade.modules],  # what each step re-initialised
                "kept": list(cascade.kept),  # parameterised layers without reset_parameters
                "spearman": _floats(nanmean(cascade.spearman, axis=0)),
                "ssim": _floats(cascade.ssim.double().mean(dim=0)),
                "hog": _floats(nanmean(cascade.hog, axis=0)),
                "mode": cascade.mode,
                "per_image": {"spearman": [_floats(r) for r in cascade.spearman],
                              "ssim": [_floats(r) for r in cascade.ssim],
                              "hog": [_floats(r) for r in cascade.hog]},
            }
        return row

    def sanity(result: Any) -> dict[str, Any]:
        """Per mode: the steps, what each re-initialised, and per step the mean/std of each similarity."""
        table: dict[str, Any] = {}
        for mode, run in result.randomizations.items():
            table[mode] = {
                "layers": list(run.layers),
                "modules": [list(m) for m in run.modules],
                "kept": list(run.kept),
                **{key: {"mean": _floats(nanmean(run.similarity(key), axis=0)),
                         "std": _floats(_nanstd(run.similarity(key))),
                         "per_image": [_floats(r) for r in run.similarity(key)]}
                   for key in ("spearman", "ssim", "hog")},
            }
        return table

    first = next(iter(results.values()), None)
    protocol_record = first.protocol.as_dict() if first is not None and rise else {}
    if faithfulness is not None:
        protocol_record = {"name": "quantus", **faithfulness["settings"]}
    record: dict[str, Any] = {
        "images": [str(p) for p in paths],
        "targets": [int(t) for t in first.targets] if first is not None else
        (faithfulness["targets"] if faithfulness is not None else []),
        "protocol": protocol_record,
        "methods": {name: {**entry(r), "flagged": flags[name]} for name, r in results.items()},
        "baselines": {name: entry(r) for name, r in baselines.items()},
    }
    if "randomization" in wanted:
        record["sanity"] = {
            "reference": "Adebayo et al., Sanity checks for saliency maps (NeurIPS 2018)",
            "compared": "absolute maps; SSIM and HOG on them min-max scaled to [0, 1]",
            "modes": modes,
            "methods": {name: sanity(r) for name, r in results.items()},
        }
    if faithfulness is not None:
        record["faithfulness"] = faithfulness
    out = OutputDir(output, inputs=paths)
    out.json("quality.json", record)
    text = quality_table({**results, **baselines}, flags) if results or baselines else ""
    if faithfulness is not None:
        text += "\n" + quantus_table(faithfulness)
    if "randomization" in wanted:
        text += "\n" + sanity_table(results)
    out.text("quality.txt", text)
    if rise:
        out.png("quality_curves.png", quality_curves_figure({**results, **baselines}))
    if "randomization" in wanted:
        out.png("randomization.png", randomization_figure(results))
        originals = {name: r.maps for name, r in results.items()}
        for mode in modes:
            runs = {name: r.randomizations[mode] for name, r in results.items()}
            for i, path in enumerate(paths):
                panel = sanity_panel(display_image(loaded.preprocess, batch.cpu(), i), originals, runs, i)
                out.png(f"randomization_{out.stem(path)}_{mode}.png", panel, source=path)
    options = {"model": loaded.name, "weights": loaded.weights, "methods": chosen, "metrics": wanted,
               "randomization": modes, "protocol": protocol_record, "layer": layer, "target": target, "seed": seed}
    _finish(out, "quality", options, record, text, json_out, failures)


def _nanstd(values: Any) -> Any:
    """Standard deviation over images (axis 0) ignoring ``nan``; all-``nan`` gives ``nan``."""
    array = np.asarray(values, dtype=np.float64)
    kept = ~np.isnan(array)
    counts = kept.sum(axis=0)
    mean = np.where(kept, array, 0.0).sum(axis=0) / np.maximum(counts, 1)
    spread = np.where(kept, (array - mean) ** 2, 0.0).sum(axis=0) / np.maximum(counts, 1)
    return np.where(counts > 0, np.sqrt(spread), np.nan)


def _quantus_protocol() -> Any:
    """``convscope.analysis.faithfulness.quantus_protocol``, or a one-line error when this build lacks it."""
    try:
        from convscope.analysis.faithfulness import quantus_protocol
    except ImportError:
        raise BadArgument("--protocol quantus", "is not available in this build (no convscope.analysis.faithfulness)",
                          "use --protocol rise") from None
    return quantus_protocol
