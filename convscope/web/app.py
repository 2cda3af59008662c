"""The local web app: FastAPI routes that parse a request, validate it with the method registry's
types, call the same library functions as the CLI and return the same pictures.

Routes (all relative, so the app works under any proxy prefix; ``--root-path`` only fixes the
OpenAPI ``servers`` entry):

- ``GET  /``                      the page (plain HTML/CSS/JS from ``static/``, no CDN)
- ``GET  /api/health``            ``{"status": "ok"}``
- ``GET  /api/methods``           the method registry as JSON (the page builds its form from it)
- ``GET  /api/models``            model names and the server's default
- ``GET  /api/model``             layers, stages and classes of a model (``?model=``)
- ``GET  /api/samples``           bundled photos; ``/api/samples/{name}`` the bytes
- ``POST /api/classify``          multipart ``image`` (+ ``topk``) -> ``{"predictions": [...]}``
- ``POST /api/explain``           multipart ``image``, ``method``, ``layer``, ``target``, options -> PNG
- ``POST /api/jobs``              the same form, run as a job -> ``{"id", "status", "progress"}``
- ``GET  /api/jobs/{id}``         status and progress; ``DELETE`` cancels;
  ``GET /api/jobs/{id}/views/{key}.png`` a finished job's picture
- ``GET  /docs``                  API docs that work offline; ``/openapi.json`` the schema

Errors are ``4xx {"error": "<one line>"}``; an unexpected failure is a 500 with one line, and
the server carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from convscope.errors import BadArgument, ConvscopeError, ImageError
from convscope.methods.registry import MethodSpec, get_method, list_methods
from convscope.web.state import JobStore, ModelCache, TempArea

log = logging.getLogger("convscope.web")

DEFAULT_MAX_UPLOAD = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000
STANDARD_FIELDS = ("image", "method", "layer", "target", "model", "view")
SAMPLES = {"chelsea.jpg": "Chelsea the cat", "coffee.jpg": "A cup of coffee"}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class UploadTooLarge(Exception):
    """The request body is over the limit."""


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes, by ``Content-Length`` before reading
    and by counting while reading (chunked uploads declare no length)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await _error_response(413, self._message())(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadTooLarge(self._message())
            return message

        try:
            await self.app(scope, limited, send)
        except UploadTooLarge as exc:
            await _error_response(413, str(exc))(scope, receive, send)

    def _message(self) -> str:
        return f"upload: request body is over the {self.limit / 1e6:g} MB limit"


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _status_for(exc: ConvscopeError) -> int:
    if isinstance(exc, ImageError) and "limit" in exc.reason:
        return 413
    if isinstance(exc, ImageError):
        return 415 if "not an image" in exc.reason else 400
    return 400


def static_dir() -> Path:
    return Path(str(resources.files("convscope.web").joinpath("static")))


def _data_file(name: str) -> Path:
    return Path(str(resources.files("convscope").joinpath(f"data/{name}")))


def _multipart(description: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for routes that parse their own multipart form."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": fields, "required": required}}}}}


_IMAGE_FIELD = {"type": "string", "format": "binary", "description": "JPEG, PNG, BMP, GIF, TIFF, WebP or PPM"}
_EXPLAIN_FIELDS = {
    "image": _IMAGE_FIELD,
    "method": {"type": "string", "enum": list_methods(), "description": "A method of GET /api/methods."},
    "layer": {"type": "string", "description": "Layer alias or module path (default: the method's)."},
    "target": {"type": "string", "description": "Class index or label (default: the top-1 class)."},
    "model": {"type": "string", "description": "Model name (default: the server's)."},
    "view": {"type": "string", "description": "Which picture of the method (default: its main one)."},
}


def create_app(
    *,
    model: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_size: int = 2,
) -> FastAPI:
    """Build the app. The default model loads at start-up, others on first use; ``cache_size`` stay cached.

    ``root_path`` (the proxy prefix) is given to the server, not here: the page and the API use
    relative URLs only, and FastAPI puts the server's root path in the schema's ``servers``.
    """
    from starlette.formparsers import MultiPartParser

    from convscope.models.load import DEFAULT_MODEL, load_model

    # Keep uploaded parts in memory (the body limit bounds them) instead of Starlette's spill
    # files in the system temp folder: the app writes only inside its own temp area.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_upload_bytes + 1)

    default_name = model or DEFAULT_MODEL
    default_weights = weights

    def loader(name: str | None, wanted: str | None) -> Any:
        return load_model(name, wanted, device=device)

    models = ModelCache(loader, capacity=cache_size)
    jobs = JobStore()
    temp = TempArea()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        try:
            await asyncio.to_thread(entry_for, None)  # load the default model before the first request
            yield
        finally:
            jobs.shutdown()
            temp.close()

    app = FastAPI(
        title="convscope",
        summary="See what a convolutional network sees: classify an image and explain the decision.",
        version=_version(),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.models = models
    app.state.jobs = jobs
    app.state.temp = temp
    app.add_middleware(BodyLimit, limit=max_upload_bytes)  # type: ignore[arg-type]

    # ------------------------------------------------------------ errors

    @app.exception_handler(ConvscopeError)
    async def _user_error(request: Request, exc: ConvscopeError) -> JSONResponse:
        return _error_response(_status_for(exc), exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return _error_response(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(MultiPartException)
    async def _multipart_error(request: Request, exc: MultiPartException) -> JSONResponse:
        return _error_response(400, f"request: malformed multipart form: {exc.message}")

    @app.exception_handler(MemoryError)
    async def _memory_error(request: Request, exc: MemoryError) -> JSONResponse:
        return _error_response(503, "server: out of memory for this request (try a smaller image)")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")

    # ------------------------------------------------------------ helpers

    def entry_for(name: str | None) -> Any:
        wanted = (name or "").strip() or default_name
        if wanted == default_name:
            return models.get(model, default_weights)
        from convscope.models.registry import get_spec

        spec = get_spec(wanted)  # UnknownModel -> 400 with close matches
        return models.get(spec.name, _offline_weights(spec))

    async def read_form(request: Request) -> FormData:
        kind = request.headers.get("content-type", "")
        if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise BadArgument("request", "must be multipart/form-data with an 'image' file field")
        return await request.form(max_files=2, max_fields=64)

    async def image_bytes(form: FormData) -> tuple[str, bytes]:
        upload = form.get("image")
        if upload is None:
            raise BadArgument("image", "missing: send the picture in a multipart field called 'image'")
        if not isinstance(upload, UploadFile):
            raise BadArgument("image", "must be a file upload, not a text field")
        data = await upload.read()
        name = _clean_name(upload.filename)
        if not data:
            raise ImageError(f"image {name}", "empty file (0 bytes)")
        return name, data

    def decode(name: str, data: bytes) -> Any:
        from convscope.imageio import load_image

        with temp.file(data) as path:
            try:
                return load_image(path, max_pixels=max_pixels)
            except ImageError as exc:
                raise ImageError(f"image {name}", exc.reason, exc.hint) from None

    def prepare(form: FormData, name: str, data: bytes) -> tuple[Any, Any, MethodSpec, dict[str, Any]]:
        method_name = _text(form, "method") or ""
        if not method_name:
            raise BadArgument("method", "missing: choose one of " + ", ".join(list_methods()))
        spec = get_method(method_name)
        options = {k: v for k, v in form.items() if k not in STANDARD_FIELDS and isinstance(v, str)}
        typed = spec.parse_options(options, strict=True)
        entry = entry_for(_text(form, "model"))
        picture = decode(name, data)
        batch = entry.loaded.preprocess.to_tensor(picture).to(entry.loaded.device)
        return entry, batch, spec, typed

    def run_explain(entry: Any, batch: Any, spec: MethodSpec, typed: dict[str, Any], layer: str | None,
                    target: int | str | None, progress: Callable[[int], None] | None = None) -> Any:
        from convscope.explore import explain

        _check_layer(entry, spec, layer)
        with entry.lock.hold(spec.hooks):
            return explain(entry.loaded, batch, spec, layer=layer, target=target, options=typed, progress=progress)

    # ------------------------------------------------------------ pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/index.html", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        from convscope.render.report import environment

        html = environment().get_template("page.html.j2").render(
            methods=[get_method(n) for n in list_methods()],
            samples=SAMPLES,
            default_model=default_name,
            version=_version(),
            max_upload_mb=max_upload_bytes / 1e6,
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}
        if name == "convscope.css":
            from convscope.render.report import stylesheet

            return Response(stylesheet(), media_type="text/css")
        path = static_dir() / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.suffix not in kinds:
            raise StarletteHTTPException(404, f"static/{name}: not found")
        return Response(path.read_bytes(), media_type=kinds[path.suffix])

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse((static_dir() / "docs.html").read_text(encoding="utf-8"))

    # ------------------------------------------------------------ API

    @app.get("/api/health", tags=["api"])
    async def health() -> dict[str, str]:
        """Liveness: ``{"status": "ok"}``."""
        return {"status": "ok"}

    @app.get("/api/status", tags=["api"])
    async def status() -> dict[str, Any]:
        """Cached models with the number of hooks attached to each (0 between requests), jobs,
        and files in the private temp area (0 between requests)."""
        return {
            "models": [{"name": m.name, "weights": m.weights, "hooks": _hook_count(m.module)} for m in models.loaded()],
            "jobs": jobs.counts(),
            "temp_files": sum(1 for _ in temp.root.iterdir()) if temp.root.exists() else 0,
        }

    @app.get("/api/methods", tags=["api"])
    async def methods() -> dict[str, Any]:
        """Every method of the registry with its options (type, default, choices, help)."""
        return {"methods": [get_method(n).schema() for n in list_methods()]}

    @app.get("/api/models", tags=["api"])
    async def model_names() -> dict[str, Any]:
        """Model names; ``default`` is the server's model."""
        from convscope.models.registry import list_models

        return {"default": default_name, "models": list_models()}

    @app.get("/api/model", tags=["api"])
    async def model_info(model: str | None = None) -> dict[str, Any]:
        """Name, weights, input size, conv stages, layers with 4-D output and class names of a model."""
        entry = await asyncio.to_thread(entry_for, model)
        if entry.info is None:
            entry.info = await asyncio.to_thread(_describe_model, entry)
        return entry.info  # type: ignore[no-any-return]

    @app.get("/api/samples", tags=["api"])
    async def samples() -> dict[str, Any]:
        """The bundled photos the page offers."""
        return {"samples": [{"name": n, "title": t, "url": f"api/samples/{n}"} for n, t in SAMPLES.items()
                            if _data_file(n).is_file()]}

    @app.get("/api/samples/{name}", tags=["api"])
    async def sample(name: str) -> Response:
        """One bundled photo."""
        if name not in SAMPLES or not _data_file(name).is_file():
            raise StarletteHTTPException(404, f"sample {name}: not found")
        return Response(_data_file(name).read_bytes(), media_type="image/jpeg")

    @app.post("/api/classify", tags=["api"], openapi_extra=_multipart(
        "The image and, optionally, how many classes.",
        {"image": _IMAGE_FIELD, "topk": {"type": "integer", "default": 5, "minimum": 1},
         "model": _EXPLAIN_FIELDS["model"]}, ["image"]))
    async def classify(request: Request) -> dict[str, Any]:
        """Top-k classes: ``{"predictions": [{"index", "label", "probability"}, ...]}``, the same items
        as ``convscope classify --json``."""
        form = await read_form(request)
        name, data = await image_bytes(form)
        spec = get_method("classify")
        typed = spec.parse_options({"topk": _text(form, "topk")})

        def work() -> dict[str, Any]:
            entry = entry_for(_text(form, "model"))
            picture = decode(name, data)
            batch = entry.loaded.preprocess.to_tensor(picture).to(entry.loaded.device)
            with entry.lock.hold(spec.hooks):
                prediction = spec.run(entry.loaded, batch, options=typed)[0]
            return {"predictions": prediction.as_dicts(), "model": entry.loaded.name,
                    "weights": entry.loaded.weights}

        return await asyncio.to_thread(work)

    @app.post("/api/explain", tags=["api"], response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "The picture; its caption is in "
                                "the X-Convscope-Caption header (percent-encoded)."}},
              openapi_extra=_multipart("The image, a method, and the method's options (see GET /api/methods).",
                                       _EXPLAIN_FIELDS, ["image", "method"]))
    async def explain_route(request: Request) -> Response:
        """Run one method and return its picture as PNG (slow methods too; use ``/api/jobs`` for progress)."""
        from convscope.render.views import png_bytes

        form = await read_form(request)
        name, data = await image_bytes(form)

        def work() -> Response:
            entry, batch, spec, typed = prepare(form, name, data)
            views = run_explain(entry, batch, spec, typed, _text(form, "layer"), _target(_text(form, "target")))
            view = _pick_view(views, _text(form, "view"))
            return Response(png_bytes(view.picture), media_type="image/png", headers=_view_headers(views, view))

        return await asyncio.to_thread(work)

    @app.post("/api/jobs", tags=["api"], status_code=202,
              openapi_extra=_multipart("As for /api/explain.", _EXPLAIN_FIELDS, ["image", "method"]))
    async def start_job(request: Request) -> JSONResponse:
        """Start a method as a cancellable job: ``{"id", "status", "progress": {"done", "total"}}``."""
        form = await read_form(request)
        name, data = await image_bytes(form)
        entry, batch, spec, typed = await asyncio.to_thread(prepare, form, name, data)
        layer, target = _text(form, "layer"), _target(_text(form, "target"))
        _check_layer(entry, spec, layer)
        total = spec.work_units(typed, int(batch.shape[-2]), int(batch.shape[-1]))
        job = jobs.submit(spec.name, total, lambda job: run_explain(entry, batch, spec, typed, layer, target,
                                                                    job.progress), _describe_error)
        return JSONResponse(job.as_json(), status_code=202)

    @app.get("/api/jobs/{job_id}", tags=["api"])
    async def job_status(job_id: str) -> dict[str, Any]:
        """Status, progress, and when done the pictures' keys, titles and captions."""
        return _job_or_404(jobs, job_id).as_json()

    @app.delete("/api/jobs/{job_id}", tags=["api"])
    async def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a job (it stops at its next progress step)."""
        if jobs.cancel(job_id) is None:
            raise StarletteHTTPException(404, f"job {job_id}: not found")
        return _job_or_404(jobs, job_id).as_json()

    @app.get("/api/jobs/{job_id}/views/{key}.png", tags=["api"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    async def job_view(job_id: str, key: str) -> Response:
        """A picture of a finished job."""
        from convscope.render.views import png_bytes

        job = _job_or_404(jobs, job_id)
        if job.status != "done":
            raise StarletteHTTPException(409, f"job {job_id}: is {job.status}, not done")
        view = _pick_view(job.result, key)
        return Response(await asyncio.to_thread(png_bytes, view.picture), media_type="image/png",
                        headers=_view_headers(job.result, view))

    return app


# ---------------------------------------------------------------- helpers


def _version() -> str:
    from convscope import __version__

    return __version__


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadArgument(name, "must be a text field, not a file")
    return value.strip() or None


def _target(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _clean_name(filename: str | None) -> str:
    name = Path(filename or "upload").name
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in name)[:80]
    return cleaned or "upload"


def _offline_weights(spec: Any) -> str:
    """Pretrained when it can load without a download (a weight package, a cached file), else random."""
    import importlib.util

    from convscope.models.registry import PackageWeights, TorchvisionWeights

    source = spec.pretrained
    if isinstance(source, PackageWeights) and importlib.util.find_spec(source.module) is not None:
        return "pretrained"
    if isinstance(source, TorchvisionWeights):
        import os

        import torch
        from torchvision.models import get_weight

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(get_weight(source.enum).url)
        if cached.exists():
            return "pretrained"
    return "random"


def _hook_count(module: Any) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in module.modules()
    )


def _describe_model(entry: Any) -> dict[str, Any]:
    from convscope.probes.layers import list_layers

    loaded = entry.loaded
    with entry.lock.exclusive():  # list_layers hooks every module for one pass
        rows = list_layers(loaded)
    layers = [
        {"name": r["name"], "alias": r["alias"], "type": r["type"]}
        for r in rows
        if isinstance(r["output_shape"], tuple) and len(r["output_shape"]) == 4 and r["type"] != "Sequential"
    ]
    c, h, w = loaded.preprocess.input_size
    return {
        "name": loaded.name, "weights": loaded.weights, "input_size": [c, h, w],
        "stages": [{"alias": a, "path": p} for a, p in loaded.stages.items()],
        "cam_layer": loaded.cam_layer, "first_conv": loaded.first_conv,
        "layers": layers, "categories": list(loaded.categories),
    }


def _check_layer(entry: Any, spec: MethodSpec, layer: str | None) -> None:
    """Resolve the layer before any work, so a bad one is a 400 naming it, even for a job."""
    if spec.layer == "none":
        if layer:
            raise BadArgument(f"layer {layer}", f"{spec.name} takes no layer")
        return
    if layer:
        from convscope.errors import UnknownLayer
        from convscope.probes.layers import resolve_layer

        try:
            resolve_layer(entry.loaded, layer)
        except UnknownLayer as exc:
            raise UnknownLayer(f"layer {layer}", exc.reason, exc.hint) from None


def _pick_view(views: Any, key: str | None) -> Any:
    try:
        return views.get(key)
    except KeyError:
        raise BadArgument(f"view {key}", "is not a picture of this method",
                          "choose from: " + ", ".join(v.key for v in views.views)) from None


def _view_headers(views: Any, view: Any) -> dict[str, str]:
    return {
        "X-Convscope-Title": quote(view.title),
        "X-Convscope-Caption": quote(view.caption),
        "X-Convscope-Views": ",".join(quote(v.key) for v in views.views),
        "X-Convscope-Record": quote(json.dumps(views.record, default=_plain)),
        "Cache-Control": "no-store",
    }


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, ConvscopeError):
        return exc.message
    if isinstance(exc, MemoryError):
        return "server: out of memory for this request"
    log.error("job failed", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {str(exc)[:200]}"


def _job_or_404(jobs: JobStore, job_id: str) -> Any:
    job = jobs.get(job_id)
    if job is None:
        raise StarletteHTTPException(404, f"job {job_id}: not found")
    return job


def run_server(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    root_path: str = "",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    log_level: str = "info",
) -> None:
    """Serve the app with uvicorn until interrupted (the CLI's ``convscope serve``)."""
    import uvicorn

    app = create_app(model=model, weights=weights, device=device, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level=log_level,
                timeout_graceful_shutdown=5)

