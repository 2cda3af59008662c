"""Pictures and text from results: ``views`` (each method's renderer: its one presentation),
``figures`` (captions, colour bars, panels), ``pictures`` (the drawing helpers the renderers
use), ``grids``, ``overlay``, ``colormaps``, ``classmap``, ``text``, ``training``. Submodules
load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("classmap", "colormaps", "figures", "grids", "overlay", "pictures", "text", "training", "views")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"convscope.render.{name}")
    raise AttributeError(f"module 'convscope.render' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_SUBMODULES)
