"""CLI commands ``explore`` (one-page HTML report) and ``serve`` (the local web app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convscope.cli.app import app, open_model
from convscope.cli.options import DeviceOpt, ImageArg, ModelOpt, SeedOpt, WeightsOpt
from convscope.errors import BadArgument


def _target(value: str | None) -> int | str | None:
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else text


@app.command("explore")
def explore_command(
    image: ImageArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Class to explain: an index or a label (default: top-1).")
    ] = None,
) -> None:
    """One self-contained HTML page with everything convscope shows about one image.

    Top-5, the layer table with receptive fields, activation maps, feature grids of three
    layers, first-layer filters, Grad-CAM and guided Grad-CAM for the top-3 classes, occlusion
    maps, deconvnet projections of three layers and saliency; every picture embedded and captioned.

    Examples: convscope explore cat.jpg -o report.html | convscope explore cup.png --target espresso
    """
    import time

    from convscope.cli.output import prepare_file
    from convscope.cli.progress import progress_bar
    from convscope.explore import explore
    from convscope.imageio import load_image
    from convscope.render.report import is_convscope_report, write_report

    if output.suffix.lower() not in (".html", ".htm"):
        raise BadArgument(f"--output {output}", "must end in .html")
    if output.exists() and output.resolve() == image.resolve():
        raise BadArgument(f"--output {output}", "is the input image")
    prepare_file(output, ours=is_convscope_report)  # before the slow part: a bad -o fails at once
    started = time.perf_counter()
    picture = load_image(image)
    loaded = open_model(model, weights, seed, device)
    batch = loaded.preprocess.to_tensor(picture).to(loaded.device)
    loaded_at = time.perf_counter()
    steps = ("classify", "summary", "activations", "features", "filters", "gradcam", "occlusion", "deconv", "saliency")
    with progress_bar(len(steps), "explore", unit="part") as advance:
        seen: list[str] = []

        def progress(name: str) -> None:
            if seen:
                advance(1)
            seen.append(name)

        result = explore(loaded, batch, image=str(image), target=_target(target), progress=progress)
        advance(1)
    rendered_at = time.perf_counter()
    path = write_report(output, result)
    done = time.perf_counter()
    label, probability = result.prediction.labels[0], float(result.prediction.probabilities[0])
    typer.echo(f"{image}: {label} ({100 * probability:.1f}%)")
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    typer.echo(f"time: load {loaded_at - started:.1f}s, {parts}, html {done - rendered_at:.1f}s, "
               f"total {done - started:.1f}s")
    typer.echo(f"wrote {path}")


def bind_warning(host: str) -> str | None:
    """A warning line when ``host`` is not a loopback address, else ``None``."""
    import ipaddress

    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    return (f"binding to {host}: anyone who can reach this address can use the app (it has no login); "
            "use the default 127.0.0.1 to keep it local")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    root_path: Annotated[
        str, typer.Option("--root-path", help="Path prefix when served behind a proxy (e.g. /proxy/8000).")
    ] = "",
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest accepted upload, in MB.")
    ] = 20.0,
) -> None:
    """A local web app: drop an image, see its top-5, then pick a layer, method and class.

    Binds to 127.0.0.1 unless --host says otherwise. API docs at /docs, the schema at /openapi.json.

    Examples: convscope serve | convscope serve --port 8080 --model alexnet --weights random |
    convscope serve --root-path /proxy/8000
    """
    from convscope.web.app import run_server

    warning = bind_warning(host)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    run_server(host=host, port=port, model=model, weights=weights, device=device, root_path=root_path,
               max_upload_bytes=int(max_upload_mb * 1_000_000))
