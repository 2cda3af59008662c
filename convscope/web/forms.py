"""Reading the web app's forms: text fields, the class a form names, and error messages in the form's terms.

The library and the CLI name options by their flags (``--label``); a web user sent form fields
(``target``). Everything here is shared by ``/api/explain`` and ``/api/jobs`` so both check a form
the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData

from convscope.errors import BadArgument, BadTarget, ConvscopeError
from convscope.methods.registry import get_method, list_methods


def text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadArgument(name, "must be a text field, not a file")
    return value.strip() or None


def class_index(loaded: Any, target: int | str | None) -> int | None:
    """The class a form names, checked against the model before any work (``None``: top-1).

    Raises:
        BadTarget: an index out of range or an unknown label (named as the CLI names them;
            ``in_form_terms`` turns that into the form's ``target``).
    """
    import torch

    from convscope.methods.targets import resolve_targets

    if target is None:
        return None
    if not loaded.categories:
        if isinstance(target, str):
            raise BadTarget(f"target {target}", f"is not a class index, and {loaded.name} has no class names",
                            "give a class index (0, 1, ...)")
        return target  # the method checks the range against the model's scores
    scores = torch.zeros(1, len(loaded.categories))
    return int(resolve_targets(target, scores, loaded.categories, loaded.name)[0])


# The library and the CLI name options by their flags; the web form names them by field.
_FORM_FIELDS = {"--label": "target", "--class": "target", "--target": "target", "--layer": "layer",
                "--model": "model"}


def _form_fields() -> dict[str, str]:
    fields = dict(_FORM_FIELDS)
    for name in list_methods():
        for param in get_method(name).params:
            if param.flag:
                fields.setdefault(param.flag, param.name)
    return fields


def in_form_terms(exc: ConvscopeError) -> ConvscopeError:
    """``exc`` with the CLI flags in its message replaced by the form fields a web user sent
    (``--label tiger: is not a class`` -> ``target tiger: ...``)."""
    fields = _form_fields()

    def swap(text: str) -> str:
        return re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", lambda m: fields.get(m.group(0), m.group(0)), text)

    subject, reason, hint = swap(exc.subject), swap(exc.reason), swap(exc.hint) if exc.hint else exc.hint
    if (subject, reason, hint) == (exc.subject, exc.reason, exc.hint):
        return exc
    return type(exc)(subject, reason, hint)


def form_model(text: str) -> tuple[str, str]:
    """The model a form names (not the server's own) and the weights it gets: ``(spec, weights)``.

    A form may name a built-in model, ``torchvision:NAME`` or ``timm:NAME``; the weights are
    ``"pretrained"`` when they load without a download (a weights package, a cached file), else
    ``"random"``. Factories (``FILE.py:FUNCTION``, ``module:FUNCTION``) and ``.pt2`` files are
    refused: they would run code or read files on the server at a visitor's request; the
    person starting the server gives them with ``convscope serve --model``.

    Raises:
        UnknownModel: an unknown name (with close matches), timm not installed.
        BadArgument: a factory or a file.
    """
    from convscope.models import external
    from convscope.models.load import check_model

    request = external.parse_model_spec(text)
    if request.runs_code:
        raise BadArgument(f"model {text}", "a factory or a model file cannot be chosen from the web page "
                          "(it would run code on the server)",
                          "start the server with convscope serve --model ... to use it")
    check_model(request.text, "random")
    if request.kind == "torchvision":
        available = external.torchvision_pretrained_available(request.target)
    elif request.kind == "timm":
        available = external.timm_pretrained_available(request.target)
    else:
        try:
            check_model(request.text, "pretrained")
            available = True
        except ConvscopeError:
            available = False
        if available and os.environ.get("CONVSCOPE_OFFLINE") != "1":
            available = _builtin_pretrained_offline(request.text)
    return request.text, "pretrained" if available else "random"


def _builtin_pretrained_offline(name: str) -> bool:
    """A built-in's pretrained weights load without a download (a package, torch hub's cache)."""
    from convscope.models.external import hub_cache_path
    from convscope.models.registry import TorchvisionWeights, get_spec

    source = get_spec(name).pretrained
    if isinstance(source, TorchvisionWeights):
        from torchvision.models import get_weight

        return hub_cache_path(get_weight(source.enum).url).is_file()
    return source is not None


def clean_name(filename: str | None) -> str:
    name = Path(filename or "upload").name
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in name)[:80]
    return cleaned or "upload"
