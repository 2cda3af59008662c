"""What the OpenAPI schema says about the web app: the error body, every route's error replies, and
the multipart forms, one ``oneOf`` branch per method (so a method's required layer is required)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from convscope.methods.registry import Param, get_method, list_methods


class Error(BaseModel):
    """Every 4xx and 5xx reply of the API."""

    error: str = Field(description="One line: the field, file or thing at fault, then what is wrong.")


_ERROR_TEXT = {
    400: "A field is missing, unknown or has a value that cannot work (the message names it).",
    404: "No such job, sample or picture; no such atlas layer or unit, or no atlas on this server.",
    409: "The job has not finished.",
    413: "The upload or the image is over the server's limit.",
    415: "The upload is not an image.",
    422: "A path or query parameter is malformed.",
    503: "Out of memory for this request.",
}


def error_replies(*codes: int, ok: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error replies a route can give (all ``{"error": ...}``), and
    ``ok``, the 200 reply, when it is not JSON."""
    responses: dict[int | str, dict[str, Any]] = {200: ok} if ok is not None else {}
    return responses | {code: {"model": Error, "description": _ERROR_TEXT[code]} for code in codes}


UPLOAD_ERRORS = (400, 413, 415, 503)
_NONBLANK = r"\S"  # a text field of only spaces counts as not given


def multipart(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for routes that parse their own multipart form."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {"multipart/form-data": {"schema": schema}}}}


_IMAGE_FIELD = {"type": "string", "format": "binary", "description": "JPEG, PNG, BMP, GIF, TIFF, WebP or PPM"}
_MODEL_FIELD = {"type": "string", "description": "Model name of GET /api/models (default: the server's)."}


def _param_schema(param: Param) -> dict[str, Any]:
    """The form field of a method option, as its ``Param`` parses it."""
    field: dict[str, Any] = {"description": param.help}
    if param.multiple:
        return field | {"type": "string", "pattern": r"^[0-9,\s]*$",
                        "description": param.help + " Comma-separated whole numbers."}
    if param.type == "int":
        field["type"] = "integer"
    elif param.type == "float":
        field["type"] = "number"
    elif param.type == "bool":
        field["type"] = "boolean"
    elif param.type == "fill":
        field["anyOf"] = [{"type": "string", "enum": list(param.choices or ())}, {"type": "number"}]
    else:
        field["type"] = "string"
        if param.choices is not None:
            field["enum"] = list(param.choices)
    for key, bound in (("minimum", param.minimum), ("maximum", param.maximum)):
        if bound is not None and param.type in ("int", "float"):
            field[key] = int(bound) if param.type == "int" and float(bound).is_integer() else bound
    if param.default is not None:
        field["default"] = param.default
    return field


def explain_form() -> dict[str, Any]:
    """The form of ``/api/explain`` and ``/api/jobs``: every field any method takes at the top (so
    clients see the image is a file part), then one ``oneOf`` branch per method saying which of
    them that method takes and requires. Another method's option, a layer for a method without
    one, or a target for a method that explains no class, is a 400."""
    specs = [get_method(n) for n in list_methods() if n != "classify"]
    layer = {"type": "string", "description": "Layer alias or module path of GET /api/model."}
    common: dict[str, Any] = {
        "image": _IMAGE_FIELD,
        "method": {"type": "string", "enum": [s.name for s in specs], "description": "A method of GET /api/methods."},
        "layer": layer,
        "target": {"type": "string", "description": "Class index (0, 1, ...) or class name (default: the top-1 "
                   "class)."},
        "model": _MODEL_FIELD,
        "view": {"type": "string", "description": "Which picture of the method (default: its main one)."},
    }
    options: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        for param in spec.params:
            field = _param_schema(param)
            if field not in options.setdefault(param.name, []):
                options[param.name].append(field)
    fields = common | {name: kinds[0] if len(kinds) == 1 else {"anyOf": kinds} for name, kinds in options.items()}
    branches = []
    for spec in specs:
        own = {p.name: _param_schema(p) for p in spec.params}
        taken = {"image", "method", "model", "view", *own}
        if spec.layer != "none":
            taken.add("layer")
        if spec.takes_target:
            taken.add("target")
        branch: dict[str, Any] = {
            "title": spec.title,
            "properties": {"method": {"const": spec.name}} | own | {name: False for name in fields if name not in taken},
            "required": ["image", "method"],
        }
        if spec.layer == "required":
            branch["properties"]["layer"] = layer | {"pattern": _NONBLANK}
            branch["required"].append("layer")
        branches.append(branch)
    return {"type": "object", "properties": fields, "required": ["image", "method"], "additionalProperties": False,
            "oneOf": branches}


def classify_form() -> dict[str, Any]:
    topk = _param_schema(get_method("classify").param("topk"))
    return {"type": "object", "properties": {"image": _IMAGE_FIELD, "topk": topk, "model": _MODEL_FIELD},
            "required": ["image"], "additionalProperties": False}


CLASSIFY_FIELDS = ("image", "topk", "model")


ATLAS_UNITS_FIELDS = ("image", "sample", "layer", "count")


def atlas_units_form(layers: list[str], samples: list[str], count: int, maximum: int) -> dict[str, Any]:
    """The form of ``/api/atlas/units``: a photo (an upload or a sample, exactly one), an atlas
    layer and how many units."""
    return {
        "type": "object",
        "properties": {
            "image": _IMAGE_FIELD,
            "sample": {"type": "string", "enum": samples, "description": "A photo of GET /api/samples."},
            "layer": {"type": "string", "enum": layers, "description": "A layer of GET /api/atlas."},
            "count": {"type": "integer", "minimum": 1, "maximum": maximum, "default": count,
                      "description": "How many units, the most active first."},
        },
        "required": ["layer"],
        "additionalProperties": False,
        "oneOf": [{"required": ["image"], "properties": {"sample": False}},
                  {"required": ["sample"], "properties": {"image": False}}],
    }
