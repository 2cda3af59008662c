"""Layer names: module paths plus model aliases, resolved in one place."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from convscope.errors import UnknownLayer, close_matches
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
        one dict per module that ran (containers included), in first-call order, with keys
        ``name``, ``alias`` (or ``None``), ``type`` and ``output_shape``.
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
    return [
        {
            "name": name,
            "alias": alias_of(loaded, name) if alias_of(loaded, name) != name else None,
            "type": type(types[name]).__name__,
            "output_shape": shapes[name],
        }
        for name in registered
    ]
