"""The one output sink of the CLI: every file goes through the atomic writers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convscope.imageio import atomic_write, save_png

SCHEMA_VERSION = 1


def safe_name(text: str) -> str:
    """A file-name-safe form of a layer or class name (``features.3`` stays, ``a/b`` -> ``a_b``)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip(".")
    return cleaned or "_"


def safe_stem(path: str | Path) -> str:
    """A file-name-safe stem for an input path (``photos/cat 1.jpg`` -> ``cat_1``)."""
    return safe_name(Path(path).stem or "image")


@dataclass
class OutputDir:
    """Writes pictures and JSON under one folder and records them for ``manifest.json``."""

    root: Path
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def png(self, name: str, picture: np.ndarray) -> Path:
        path = save_png(self.root / name, picture)
        self.written.append(name)
        return path

    def json(self, name: str, payload: Any) -> Path:
        path = atomic_write(self.root / name, json.dumps(payload, indent=2, default=_plain) + "\n")
        self.written.append(name)
        return path

    def text(self, name: str, text: str) -> Path:
        path = atomic_write(self.root / name, text)
        self.written.append(name)
        return path

    def manifest(self, command: str, options: dict[str, Any]) -> Path:
        """Written last, so a folder with a manifest is complete."""
        return atomic_write(
            self.root / "manifest.json",
            json.dumps(
                {"schema_version": SCHEMA_VERSION, "command": command, "options": options,
                 "files": sorted(set(self.written))},
                indent=2, default=_plain,
            ) + "\n",
        )


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
