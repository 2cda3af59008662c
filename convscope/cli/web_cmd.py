"""CLI commands ``explore`` (one-page HTML report) and ``serve`` (the local web app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convscope.cli.common import open_model
from convscope.cli.options import DeviceOpt, ImageArg, ModelOpt, OutputIndexOpt, SeedOpt, WeightsOpt
from convscope.errors import BadArgument


def _target(value: str | None) -> int | str | None:
    """``--target``: None (top-1) when absent or blank, else an index or a label (``parse_class_index``)."""
    from convscope.parsing import parse_class_index

    if value is None or value.strip() == "":
        return None
    return parse_class_index(value, subject="--target")


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
    output_index: OutputIndexOpt = None,
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
    from convscope.imageio import load_image, shown_path
    from convscope.render.report import is_convscope_report, write_report

    if output.suffix.lower() not in (".html", ".htm"):
        raise BadArgument(f"--output {output}", "must end in .html")
    if output.exists() and output.resolve() == image.resolve():
        raise BadArgument(f"--output {output}", "is the input image")
    wanted = _target(target)
    prepare_file(output, ours=is_convscope_report)  # before the slow part: a bad -o fails at once
    started = time.perf_counter()
    picture = load_image(image)
    loaded = open_model(model, weights, seed, device, output_index=output_index)
    batch = loaded.preprocess.to_tensor(picture).to(loaded.device)
    loaded_at = time.perf_counter()
    steps = ("classify", "summary", "activations", "features", "filters", "gradcam", "occlusion", "deconv", "saliency")
    with progress_bar(len(steps), "explore", unit="part") as advance:
        seen: list[str] = []

        def progress(name: str) -> None:
            if seen:
                advance(1)
            seen.append(name)

        # The name as shown in the page: a file name that is not UTF-8 cannot be written into it.
        result = explore(loaded, batch, image=shown_path(image), target=wanted, progress=progress)
        advance(1)
    rendered_at = time.perf_counter()
    prepare_file(output, ours=is_convscope_report)  # again: the user may have saved a file there meanwhile
    path = write_report(output, result)
    done = time.perf_counter()
    label, probability = result.prediction.labels[0], float(result.prediction.probabilities[0])
    typer.echo(f"{shown_path(image)}: {label} ({100 * probability:.1f}%)")
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    graded = sum(seconds for _, seconds in result.grading.values())
    grading = f", grading {graded:.1f}s ({len(result.grading)} maps)" if result.grading else ""
    typer.echo(f"time: load {loaded_at - started:.1f}s, {parts}{grading}, html {done - rendered_at:.1f}s, "
               f"total {done - started:.1f}s")
    typer.echo(f"wrote {shown_path(path)}")


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


# A bound above what the app can hold: uploads are kept in memory, and no photo needs this much.
MAX_UPLOAD_MB = 1000.0


def check_address(host: str, port: int) -> None:
    """Bind ``host:port`` for a moment, so a port in use is one line before the model loads.

    Raises:
        BadArgument: ``<host>:<port>: <reason>`` (in use, not an address of this machine, ...).
    """
    import errno
    import socket

    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds it
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn sets it too
            probe.bind((host.strip("[]"), port))
    except socket.gaierror as exc:
        raise BadArgument(f"--host {host}", f"is not a known host name ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BadArgument(shown, "address already in use",
                              "is another server running? choose another --port") from None
        if exc.errno == errno.EACCES:
            raise BadArgument(shown, "permission denied", "ports below 1024 need privileges: "
                              "choose another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BadArgument(shown, "is not an address of this machine", "use 127.0.0.1") from None
        raise BadArgument(shown, f"cannot listen here ({exc.strerror or exc})") from None


def serve_numbers(port: str, max_upload_mb: str) -> tuple[int, float]:
    """``serve``'s ``--port`` and ``--max-upload-mb`` as numbers in range (one ``error:`` line otherwise)."""
    from convscope.parsing import parse_float, parse_int

    return (parse_int(port, subject="--port", minimum=0, maximum=65535),
            parse_float(max_upload_mb, subject="--max-upload-mb", minimum=0.001, maximum=MAX_UPLOAD_MB))


def serve_command(
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: loopback only).")] = "127.0.0.1",
    port: Annotated[
        str, typer.Option("--port", metavar="PORT", help="TCP port, 0 to 65535 (0: any free port).")
    ] = "8000",
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    root_path: Annotated[
        str, typer.Option("--root-path", help="Path prefix when served behind a proxy (e.g. /proxy/8000).")
    ] = "",
    max_upload_mb: Annotated[
        str, typer.Option("--max-upload-mb", metavar="MB",
                          help=f"Largest accepted upload, in MB (0.001 to {MAX_UPLOAD_MB:g}).")
    ] = "20",
    output_index: OutputIndexOpt = None,
    atlas: Annotated[
        Path | None, typer.Option("--atlas", metavar="FOLDER", help="Show an atlas (a folder convscope atlas "
                                  "wrote) in an Atlas tab; the model and weights are the atlas's.")
    ] = None,
) -> None:
    """A local web app: drop an image, see its top-5, then pick a layer, method and class.

    Binds to 127.0.0.1 unless --host says otherwise. API docs at /docs, the schema at /openapi.json.
    With --atlas, an Atlas tab browses the atlas's units and finds the units a photo excites; the
    served model is the atlas's (--model may only repeat it), with the weights it recorded.

    Examples: convscope serve | convscope serve --port 8080 --model alexnet --weights random |
    convscope serve --root-path /proxy/8000 | convscope serve --atlas atlas/
    """

    from convscope.models.load import check_model, resolve_device
    from convscope.web.app import run_server

    port_number, upload_mb = serve_numbers(port, max_upload_mb)
    warning = bind_warning(host)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    check_address(host, port_number)
    resolve_device(device)
    if atlas is not None:
        from convscope.web.atlas import load_atlas, served_model

        # A bad folder, another --model or a lost weights file: one line before the model loads.
        served = served_model(load_atlas(atlas), model, weights)
        if served.note:
            typer.echo(f"warning: {served.note}", err=True)
        model, weights = served.model, served.weights
    check_model(model, weights)  # an unknown model or missing weights: one line, before the server starts
    run_server(host=host, port=port_number, model=model, weights=weights, device=device, root_path=root_path,
               max_upload_bytes=round(upload_mb * 1_000_000), output_index=output_index, atlas=atlas)
