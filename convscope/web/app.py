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

With an atlas (``convscope serve --atlas FOLDER``, ``create_app(atlas=...)``; otherwise these are
404 and absent from the schema):

- ``GET  /api/atlas``             the model and the layers with their units
- ``GET  /api/atlas/{layer}/{unit}``  a unit: statistics and its pictures' URLs
- ``GET  /api/atlas/{layer}/{unit}/{name}.png``  one picture (only those ``atlas.json`` names)
- ``POST /api/atlas/units``       multipart ``image`` or ``sample``, ``layer``, ``count`` -> the
  atlas units of that layer that fire most on the photo, with their activation maps

Every attribution map grades itself (``analysis.grading``): its record (the
``X-Convscope-Record`` header, a job's ``record``) carries ``"faithfulness"`` and its caption ends
with the deletion and insertion AUC next to a random map's.

Errors are ``4xx {"error": "<one line>"}`` naming the form field at fault (``target``, not the
CLI's ``--label``); an unexpected failure is a 500 with one line, and the server carries on. The
OpenAPI schema documents every error reply and, per method, which form fields it takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from convscope.errors import BadArgument, ConvscopeError, ImageError
from convscope.methods.registry import MethodSpec, get_method, list_methods
from convscope.parsing import parse_class_index, parse_int
from convscope.web.atlas import (
    PATCH_PICTURES,
    PICTURE_PATTERN,
    Atlas,
    PhotoUnit,
    load_atlas,
    photo_units,
    served_model,
)
from convscope.web.forms import class_index, clean_name, form_model, in_form_terms, text_field
from convscope.web.limits import BodyLimit, error_response, status_for
from convscope.web.openapi import (
    ATLAS_UNITS_FIELDS,
    CLASSIFY_FIELDS,
    UPLOAD_ERRORS,
    atlas_units_form,
    classify_form,
    error_replies,
    explain_form,
    multipart,
)
from convscope.web.state import JobStore, ModelCache, TempArea

log = logging.getLogger("convscope.web")
_T = TypeVar("_T")

DEFAULT_MAX_UPLOAD = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000
CANCEL_WAIT_SECONDS = 10.0
STANDARD_FIELDS = ("image", "method", "layer", "target", "model", "view")
SAMPLES = {"chelsea.jpg": "Chelsea the cat", "coffee.jpg": "A cup of coffee"}
ATLAS_COUNT = 9
MAX_ATLAS_COUNT = 256


def static_dir() -> Path:
    return Path(str(resources.files("convscope.web").joinpath("static")))


def _data_file(name: str) -> Path:
    return Path(str(resources.files("convscope").joinpath(f"data/{name}")))




@dataclass
class Explanation:
    """A checked ``/api/explain`` or ``/api/jobs`` form, ready to run."""

    entry: Any
    batch: Any
    spec: MethodSpec
    options: dict[str, Any]
    layer: str | None
    target: int | None


def create_app(
    *,
    model: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_size: int = 2,
    output_index: int | str | None = None,
    atlas: Path | None = None,
) -> FastAPI:
    """Build the app. The default model loads at start-up, others on first use; ``cache_size`` stay cached.

    ``model`` takes every model spec ``load_model`` does (``torchvision:NAME``, a factory, a
    ``.pt2``...); ``output_index`` picks its logits when it returns a tuple or dict. A form may
    name built-in, ``torchvision:`` and ``timm:`` models, never a factory or a file
    (``web/forms.form_model``).

    ``root_path`` (the proxy prefix) is given to the server, not here: the page and the API use
    relative URLs only, and FastAPI puts the server's root path in the schema's ``servers``.

    ``atlas``: a folder ``convscope atlas`` wrote; the app then shows it (the ``/api/atlas``
    routes and the page's Atlas tab), and the default model is the atlas's, with the weights it
    recorded (``web.atlas.served_model``; ``model`` may only name the same model).

    Raises:
        DataError: ``atlas`` is not a readable atlas folder.
        BadArgument: ``model`` is not the atlas's model; its recorded weights file is gone.
    """
    from starlette.formparsers import MultiPartParser

    from convscope.models.load import DEFAULT_MODEL, load_model

    # Keep uploaded parts in memory (the body limit bounds them) instead of Starlette's spill
    # files in the system temp folder: the app writes only inside its own temp area.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_upload_bytes + 1)

    shown_atlas = load_atlas(atlas) if atlas is not None else None
    seed = 0
    if shown_atlas is not None:
        served = served_model(shown_atlas, model, weights)
        model, weights, seed = served.model, served.weights, served.seed
    default_name = model or DEFAULT_MODEL
    default_weights = weights

    def loader(name: str | None, wanted: str | None, index: int | str | None = None) -> Any:
        return load_model(name, wanted, seed=seed, device=device, output_index=index)

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
    app.state.atlas = shown_atlas
    app.add_middleware(BodyLimit, limit=max_upload_bytes)  # type: ignore[arg-type]

    # ------------------------------------------------------------ errors

    @app.exception_handler(ConvscopeError)
    async def _user_error(request: Request, exc: ConvscopeError) -> JSONResponse:
        return error_response(status_for(exc), in_form_terms(exc).message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette's Allow names the first route of the path only
            response.headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error_response(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(MultiPartException)
    async def _multipart_error(request: Request, exc: MultiPartException) -> JSONResponse:
        return error_response(400, f"request: malformed multipart form: {exc.message}")

    @app.exception_handler(MemoryError)
    async def _memory_error(request: Request, exc: MemoryError) -> JSONResponse:
        return error_response(503, "server: out of memory for this request (try a smaller image)")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")

    # ------------------------------------------------------------ helpers

    def entry_for(name: str | None) -> Any:
        wanted = (name or "").strip() or default_name
        if wanted == default_name:
            return models.get(model, default_weights, output_index)
        spec, chosen = form_model(wanted)  # UnknownModel -> 400 with close matches; no factories
        return models.get(spec, chosen)

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
        name = clean_name(upload.filename)
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

    def validate(form: FormData, name: str, data: bytes) -> Explanation:
        """Check everything in an ``/api/explain`` or ``/api/jobs`` form that can be checked before
        running (the method, its options, the model, the image, the layer, the class), so both
        routes answer a bad form with the same 400 and a job is queued only when it can start."""
        method_name = text_field(form, "method") or ""
        if not method_name:
            raise BadArgument("method", "missing: choose one of " + ", ".join(list_methods()))
        spec = get_method(method_name)
        options = {k: v for k, v in form.items() if k not in STANDARD_FIELDS}
        for key, value in options.items():
            if not isinstance(value, str) and key in {p.name for p in spec.params}:
                raise BadArgument(key, "must be a text field, not a file")
        typed = spec.parse_options(options, strict=True)
        layer, target_text = text_field(form, "layer"), text_field(form, "target")
        if spec.layer == "required" and not layer:
            raise BadArgument("layer", f"is required by {spec.name}: name a layer alias or module path")
        if target_text is not None and not spec.takes_target:
            raise BadArgument(f"target {target_text}", f"{spec.name} takes no target")
        target = parse_class_index(target_text, subject="target") if target_text is not None else None
        entry = entry_for(text_field(form, "model"))
        _check_layer(entry, spec, layer)
        target_index = class_index(entry.loaded, target)
        picture = decode(name, data)
        batch = entry.loaded.preprocess.to_tensor(picture).to(entry.loaded.device)
        return Explanation(entry, batch, spec, typed, layer, target_index)

    def run_explain(checked: Explanation, progress: Callable[[int], None] | None = None) -> Any:
        from convscope.explore import explain

        with checked.entry.lock.hold(checked.spec.hooks):
            return explain(checked.entry.loaded, checked.batch, checked.spec, layer=checked.layer,
                           target=checked.target, options=checked.options, progress=progress, grade=True)

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
            "atlas": shown_atlas is not None,
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

    @app.get("/api/model", tags=["api"], responses=error_replies(400, 422, 503))
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

    @app.get("/api/samples/{name}", tags=["api"], response_class=Response,
             responses=error_replies(404, 422, ok={"content": {"image/jpeg": {}}, "description": "The photo."}))
    async def sample(name: str) -> Response:
        """One bundled photo."""
        if name not in SAMPLES or not _data_file(name).is_file():
            raise StarletteHTTPException(404, f"sample {name}: not found")
        return Response(_data_file(name).read_bytes(), media_type="image/jpeg")

    @app.post("/api/classify", tags=["api"], responses=error_replies(*UPLOAD_ERRORS), openapi_extra=multipart(
        "The image and, optionally, how many classes.", classify_form()))
    async def classify(request: Request) -> dict[str, Any]:
        """Top-k classes: ``{"predictions": [{"index", "label", "probability"}, ...]}``, the same items
        as ``convscope classify --json``."""
        form = await read_form(request)
        name, data = await image_bytes(form)
        spec = get_method("classify")
        unknown = sorted(k for k in form if k not in CLASSIFY_FIELDS)
        if unknown:
            raise BadArgument(unknown[0], "is not a field of classify", "fields: " + ", ".join(CLASSIFY_FIELDS))
        typed = spec.parse_options({"topk": text_field(form, "topk")})

        def work() -> dict[str, Any]:
            entry = entry_for(text_field(form, "model"))
            picture = decode(name, data)
            batch = entry.loaded.preprocess.to_tensor(picture).to(entry.loaded.device)
            with entry.lock.hold(spec.hooks):
                prediction = spec.run(entry.loaded, batch, options=typed)[0]
            return {"predictions": prediction.as_dicts(), "model": entry.loaded.name,
                    "weights": entry.loaded.weights}

        return await asyncio.to_thread(work)

    @app.post("/api/explain", tags=["api"], response_class=Response,
              responses=error_replies(*UPLOAD_ERRORS, ok={"content": {"image/png": {}}, "description": "The picture; "
                                "its caption is in the X-Convscope-Caption header (percent-encoded)."}),
              openapi_extra=multipart("The image, a method, and the method's options (see GET /api/methods).",
                                       explain_form()))
    async def explain_route(request: Request) -> Response:
        """Run one method and return its picture as PNG (slow methods too; use ``/api/jobs`` for progress)."""
        from convscope.render.views import png_bytes

        form = await read_form(request)
        name, data = await image_bytes(form)

        def work() -> Response:
            views = run_explain(validate(form, name, data))
            view = _pick_view(views, text_field(form, "view"))
            return Response(png_bytes(view.picture), media_type="image/png", headers=_view_headers(views, view))

        return await asyncio.to_thread(work)

    @app.post("/api/jobs", tags=["api"], status_code=202, responses=error_replies(*UPLOAD_ERRORS),
              openapi_extra=multipart("As for /api/explain.", explain_form()))
    async def start_job(request: Request) -> JSONResponse:
        """Start a method as a cancellable job: ``{"id", "status", "progress": {"done", "total"}}``
        (``total`` is ``null`` when the method cannot tell in advance). The form is checked as
        ``/api/explain`` checks it before the job is queued."""
        form = await read_form(request)
        name, data = await image_bytes(form)
        checked = await asyncio.to_thread(validate, form, name, data)
        total = checked.spec.work_units(checked.options, int(checked.batch.shape[-2]), int(checked.batch.shape[-1]))
        job = jobs.submit(checked.spec.name, total, lambda job: run_explain(checked, job.progress), _describe_error)
        return JSONResponse(job.as_json(), status_code=202)

    @app.get("/api/jobs/{job_id}", tags=["api"], responses=error_replies(404, 422))
    async def job_status(job_id: str) -> dict[str, Any]:
        """Status, progress, and when done the pictures' keys, titles and captions."""
        return _job_or_404(jobs, job_id).as_json()

    @app.delete("/api/jobs/{job_id}", tags=["api"], responses=error_replies(404, 422))
    async def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a job. It stops at its next progress step, after the forward batch under way;
        the answer waits a few seconds for that, so it usually says ``cancelled``."""
        job = await asyncio.to_thread(jobs.cancel, job_id, wait=CANCEL_WAIT_SECONDS)
        if job is None:
            raise StarletteHTTPException(404, f"job {job_id}: not found")
        return job.as_json()  # type: ignore[no-any-return]

    @app.get("/api/jobs/{job_id}/views/{key}.png", tags=["api"], response_class=Response,
             responses=error_replies(400, 404, 409, 422, ok={"content": {"image/png": {}}, "description": "The picture."}))
    async def job_view(job_id: str, key: str) -> Response:
        """A picture of a finished job."""
        from convscope.render.views import png_bytes

        job = _job_or_404(jobs, job_id)
        if job.status != "done":
            raise StarletteHTTPException(409, f"job {job_id}: is {job.status}, not done")
        view = _pick_view(job.result, key)
        return Response(await asyncio.to_thread(png_bytes, view.picture), media_type="image/png",
                        headers=_view_headers(job.result, view))

    # ------------------------------------------------------------ the atlas

    def atlas_or_404() -> Atlas:
        if shown_atlas is None:
            raise StarletteHTTPException(404, "atlas: this server shows none (start it with convscope serve "
                                         "--atlas FOLDER)")
        return shown_atlas

    in_schema = shown_atlas is not None
    layer_param = PathParam(description="A layer of GET /api/atlas.", json_schema_extra=(
        {"enum": list(shown_atlas.layers)} if shown_atlas is not None else None))
    unit_param = PathParam(description="A unit (channel id) of that layer in GET /api/atlas.")
    picture_param = PathParam(pattern=PICTURE_PATTERN, description=(
        "featurevis, negative, crop_I, projection_I, relevance_crop_I or relevance_map_I (I: the patch's "
        "position in the unit's list)"))

    @app.get("/api/atlas", tags=["atlas"], include_in_schema=in_schema, responses=error_replies(404))
    async def atlas_index() -> dict[str, Any]:
        """The atlas: its model, what it was mined from, and its layers with their units
        (``units`` ids, ``thumbnails`` the URLs of their feature visualisations)."""
        return _atlas_json(atlas_or_404())

    @app.get("/api/atlas/{layer}/{unit}", tags=["atlas"], include_in_schema=in_schema,
             responses=error_replies(404, 422))
    async def atlas_unit(layer: str = layer_param, unit: int = unit_param) -> dict[str, Any]:
        """One unit: ``stats``, the URLs of its feature visualisation and negative, and its top
        ``patches`` (crop and deconvnet projection) and ``relevance_patches`` (crop and CRP map)."""
        shown = atlas_or_404()
        return _found(lambda: _unit_json(shown, layer, unit))

    @app.get("/api/atlas/{layer}/{unit}/{name}.png", tags=["atlas"], include_in_schema=in_schema,
             response_class=Response, responses=error_replies(
                 404, 422, ok={"content": {"image/png": {}}, "description": "The picture."}))
    async def atlas_picture(
        layer: str = layer_param,
        unit: int = unit_param,
        name: str = picture_param,
    ) -> Response:
        """A picture of a unit, as ``atlas.json`` names it (nothing else in the folder is served)."""
        shown = atlas_or_404()
        path = await asyncio.to_thread(_found, lambda: shown.picture(layer, unit, name))
        data = await asyncio.to_thread(path.read_bytes)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.post("/api/atlas/units", tags=["atlas"], include_in_schema=in_schema,
              responses=error_replies(*UPLOAD_ERRORS, 404), openapi_extra=multipart(
                  "A photo (an upload, or a sample of GET /api/samples), an atlas layer and how many units.",
                  atlas_units_form(list(shown_atlas.layers) if shown_atlas else [], _sample_names(),
                                   ATLAS_COUNT, MAX_ATLAS_COUNT)))
    async def atlas_photo_units(request: Request) -> dict[str, Any]:
        """Units for this photo: the atlas units of ``layer`` that fire most on it (by the
        channel's maximum over its map), strongest first, each with ``value``, its activation
        map over the photo (``map``, a PNG data URI), its ``url`` and the page's ``anchor``."""
        shown = atlas_or_404()
        form = await read_form(request)
        unknown = sorted(k for k in form if k not in ATLAS_UNITS_FIELDS)
        if unknown:
            raise BadArgument(unknown[0], "is not a field of atlas/units", "fields: " + ", ".join(ATLAS_UNITS_FIELDS))
        layer_name = text_field(form, "layer")
        if layer_name is None:
            raise BadArgument("layer", "missing: choose one of " + ", ".join(shown.layers))
        count_text = text_field(form, "count")
        count = (ATLAS_COUNT if count_text is None
                 else parse_int(count_text, subject="count", minimum=1, maximum=MAX_ATLAS_COUNT))
        sample_name = text_field(form, "sample")
        if sample_name is not None:
            if "image" in form:
                raise BadArgument("sample", "give an image or a sample, not both")
            if sample_name not in _sample_names():
                raise BadArgument(f"sample {sample_name}", "is not a sample", "choose from: " + ", ".join(SAMPLES))
            name, data = sample_name, _data_file(sample_name).read_bytes()
        elif "image" in form:
            name, data = await image_bytes(form)
        else:
            raise BadArgument("image", "missing: send the picture in a multipart field called 'image', "
                              "or name a sample in 'sample'")
        atlas_layer = shown.layer(layer_name)

        def work() -> dict[str, Any]:
            from convscope.render.views import png_bytes

            entry = entry_for(None)
            picture = decode(name, data)
            batch = entry.loaded.preprocess.to_tensor(picture).to(entry.loaded.device)
            with entry.lock.exclusive():  # the capture hooks the layer
                found = photo_units(entry.loaded, batch, atlas_layer, count)
            return {
                "model": entry.loaded.name, "weights": entry.loaded.weights, "layer": atlas_layer.name,
                "image": name,
                "units": [_photo_unit_json(shown, atlas_layer.name, item, _data_uri(png_bytes(item.picture)))
                          for item in found],
            }

        return await asyncio.to_thread(work)

    return app


# ---------------------------------------------------------------- helpers


def _sample_names() -> list[str]:
    return [n for n in SAMPLES if _data_file(n).is_file()]


def _found(call: Callable[[], _T]) -> _T:
    """``call()``, its one-line user error a 404 (an atlas lookup: no such layer, unit, picture)."""
    try:
        return call()
    except ConvscopeError as exc:
        raise StarletteHTTPException(404, exc.message) from None


def _unit_url(layer: str, unit: int) -> str:
    # Relative, like every URL of the app, so it works under a proxy prefix.
    return f"api/atlas/{quote(layer, safe='')}/{unit}"


def _picture_url(layer: str, unit: int, name: str) -> str:
    return f"{_unit_url(layer, unit)}/{name}.png"


def _anchor(layer: str, unit: int | None = None) -> str:
    """The page's address of a layer or unit in its Atlas tab."""
    return f"#atlas/{quote(layer, safe='')}" + ("" if unit is None else f"/{unit}")


def _atlas_json(atlas: Atlas) -> dict[str, Any]:
    document = atlas.document
    keys = ("model", "weights", "data", "images", "skipped", "input_size", "classes", "featurevis", "relevance")
    return {key: document.get(key) for key in keys} | {"layers": [
        {"name": layer.name, "path": layer.record.get("path"), "channels": layer.record.get("channels"),
         "boxes_exact": layer.record.get("boxes_exact"), "anchor": _anchor(layer.name),
         "units": list(layer.units),
         "thumbnails": [_picture_url(layer.name, unit, "featurevis") for unit in layer.units]}
        for layer in atlas.layers.values()
    ]}


def _unit_json(atlas: Atlas, layer: str, unit: int) -> dict[str, Any]:
    record = atlas.unit(layer, unit)
    stats = record.get("stats") or {}
    out: dict[str, Any] = {
        "layer": layer, "path": atlas.layer(layer).record.get("path"), "unit": unit,
        "anchor": _anchor(layer, unit), "url": _unit_url(layer, unit),
        "featurevis": _picture_url(layer, unit, "featurevis"), "negative": _picture_url(layer, unit, "negative"),
        "objective": record.get("objective"), "negative_objective": record.get("negative_objective"),
        "stats": stats,
    }
    for kind, (crop, projection) in PATCH_PICTURES.items():
        out[kind] = [patch | {"crop": _picture_url(layer, unit, f"{crop}_{i}"),
                              "projection": _picture_url(layer, unit, f"{projection}_{i}")}
                     for i, patch in enumerate(record.get(kind) or ())]
    return out


def _photo_unit_json(atlas: Atlas, layer: str, item: PhotoUnit, picture: str) -> dict[str, Any]:
    stats = atlas.unit(layer, item.unit).get("stats") or {}
    return {"unit": item.unit, "value": item.value if math.isfinite(item.value) else None,
            "dataset_max": stats.get("max"), "map": picture, "url": _unit_url(layer, item.unit),
            "anchor": _anchor(layer, item.unit), "featurevis": _picture_url(layer, item.unit, "featurevis")}


def _data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _version() -> str:
    from convscope import __version__

    return __version__


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
        {"name": r["name"], "alias": r["alias"], "type": r["type"], "layout": r["layout"]}
        for r in rows
        # Containers only when they are a stage or the CAM layer (ResNet's layer4, RegNet's trunk_output).
        if r["layout"] in ("NCHW", "NHWC", "tokens")
        and (r["type"] != "Sequential" or r["name"] == loaded.cam_layer or r["name"] in loaded.stages.values())
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
        return in_form_terms(exc).message
    if isinstance(exc, MemoryError):
        return "server: out of memory for this request"
    log.error("job failed", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {str(exc)[:200]}"


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of the request's path answers (``GET, DELETE`` for a job)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    order = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


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
    output_index: int | str | None = None,
    atlas: Path | None = None,
) -> None:
    """Serve the app with uvicorn until interrupted (the CLI's ``convscope serve``)."""
    import uvicorn

    app = create_app(model=model, weights=weights, device=device, max_upload_bytes=max_upload_bytes,
                     output_index=output_index, atlas=atlas)
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level=log_level,
                timeout_graceful_shutdown=5)

