"""Layer names: module paths plus model aliases, resolved in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from convscope.errors import UnknownLayer, close_matches
from convscope.probes.layout import DID_NOT_RUN, NCHW_LAYOUT, Layout, Measured, measure, not_a_map
from convscope.types import LoadedModel
from convscope.validate import check_layer_name


def resolve_layer(model: LoadedModel, name: str) -> tuple[str, nn.Module]:
    """Alias or module path -> ``(module path, module)``.

    Raises:
        UnknownLayer: listing the aliases and a few close module paths.
        BadInputType: ``name`` is not a string.
    """
    check_layer_name(name)
    modules = dict(model.module.named_modules())
    path = model.stages.get(name, name)
    if path and path in modules:
        return path, modules[path]
    paths = [n for n in modules if n]
    near = close_matches(name, list(model.stages) + paths)
    parts = [near] if near.startswith("did you mean") else []
    if model.stages:
        parts.append("aliases: " + ", ".join(model.stages))
    parts.append(f"module paths: {', '.join(paths[:6])}, ... (see 'convscope layers')")
    hint = "; ".join(parts)
    raise UnknownLayer(name, f"no such layer in {model.name}", hint)


@dataclass(frozen=True)
class MapLayer:
    """A layer read as a feature map: the name as given, its module path and module, and its
    measured layout (``to_nchw`` reads it; ``record()`` goes into the method's JSON)."""

    name: str
    path: str
    module: nn.Module
    layout: Layout


def layout_of(model: LoadedModel, path: str, input_size: Sequence[int] | None = None) -> Layout:
    """The measured layout of a module path's output, for inputs of ``input_size`` ``(C, H, W)``
    (default: the model's preprocessing). Built-in registry models are CNNs whose every map is
    NCHW: they are not traced (a command pays no extra forward)."""
    if model.spec is not None:
        return NCHW_LAYOUT
    measured = measure(model, input_size, partial=True)
    found = measured.layouts.get(path)
    if found is None:
        if measured.failure:  # the layer comes after the part of the network that ran
            raise UnknownLayer("model", measured.failure, "check the model's input size (its preprocessing)")
        return Layout("other", why=DID_NOT_RUN)
    return found


def map_layer(model: LoadedModel, name: str, input_size: Sequence[int] | None = None) -> MapLayer:
    """Resolve ``name`` (alias or module path) and check that it is a spatial feature map, for
    inputs of ``input_size`` ``(C, H, W)`` (default: the model's preprocessing; methods pass
    their batch's, so a model measured on the image it is given).

    Raises:
        UnknownLayer: no such layer, or its layout (measured, not assumed) is not a map: one line
            naming the layout (``vector 1000``, ``other: returns a tuple of 2 items``...).
    """
    path, module = resolve_layer(model, name)
    layout = layout_of(model, path, input_size)
    if model.spec is None and not layout.spatial:
        raise not_a_map(name, layout)
    return MapLayer(name, path, module, layout)


def default_cam_layer(model: LoadedModel, input_size: Sequence[int] | None = None) -> str:
    """The model's default CAM layer; for a model wrapped unmeasured (its forward did not run at
    its preprocessing's size), measured now at ``input_size``. ``""`` when it has none."""
    if model.cam_layer or model.spec is not None or input_size is None:
        return model.cam_layer
    measured = _measured_or_none(model, input_size)
    return measured.cam_layer if measured is not None else ""


def default_stages(model: LoadedModel, input_size: Sequence[int] | None = None) -> dict[str, str]:
    """The model's stages; for a model wrapped unmeasured, measured now at ``input_size``."""
    if model.stages or model.spec is not None or input_size is None:
        return dict(model.stages)
    measured = _measured_or_none(model, input_size)
    return dict(measured.stages) if measured is not None else {}


def _measured_or_none(model: LoadedModel, input_size: Sequence[int]) -> Measured | None:
    try:
        return measure(model, input_size)
    except UnknownLayer:  # the forward fails at this size too: the method reports it on its own run
        return None


def resolve_layers(model: LoadedModel, names: Sequence[str]) -> dict[str, nn.Module]:
    """Names as given -> modules, preserving order."""
    return {name: resolve_layer(model, name)[1] for name in names}


def alias_of(model: LoadedModel, path: str) -> str:
    """The friendly alias for a module path, or the path itself."""
    for alias, target in model.stages.items():
        if target == path:
            return alias
    return path


def list_layers(model: LoadedModel | nn.Module, *, input_size: Sequence[int] | None = None) -> list[dict[str, object]]:
    """The layers a user can name: module path, alias, type and output shape for one image.

    Returns:
        one dict per module that ran (containers included), in registration order, with keys
        ``name``, ``alias`` (or ``None``), ``type``, ``output_shape`` and ``layout`` (``NCHW``,
        ``NHWC``, ``tokens``, ``vector`` or ``other``: measured by ``probes/layout.py`` for
        any model; a built-in CNN's maps are NCHW).
    """
    import torch

    from convscope.models.load import as_loaded
    from convscope.probes.hooks import eval_mode, trace_calls

    loaded = as_loaded(model)
    size = tuple(input_size or loaded.preprocess.input_size)
    with trace_calls(loaded.module, keep_tensors=False) as traced, eval_mode(loaded.module), torch.inference_mode():
        loaded.module(torch.zeros((1, *size), device=loaded.device, dtype=loaded.dtype))
    types: dict[str, nn.Module] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    for call in traced.calls:  # a module's first call counts
        if call.path and call.path not in shapes:
            types[call.path], shapes[call.path] = call.module, call.output_shape
    # Forward hooks fire when a module finishes, so containers come after their children;
    # list in registration order instead, which reads top-down.
    registered = [name for name, _ in loaded.module.named_modules() if name in shapes]
    measured = measure(loaded) if loaded.spec is None and tuple(size) == tuple(loaded.preprocess.input_size) else None
    return [
        {
            "name": name,
            "alias": alias_of(loaded, name) if alias_of(loaded, name) != name else None,
            "type": type(types[name]).__name__,
            "output_shape": shapes[name],
            "layout": _layout_name(measured.layouts.get(name) if measured else None, shapes[name]),
        }
        for name in registered
    ]


def _layout_name(layout: Layout | None, shape: tuple[int, ...] | None) -> str:
    """The layout column: measured for any model; a built-in CNN's 4-D outputs are NCHW."""
    if layout is not None:
        return layout.kind
    if shape is None:
        return "other"
    return {4: "NCHW", 2: "vector"}.get(len(shape), "other")
