"""The ``occlusion`` command's writer: Zeiler & Fergus occlusion sensitivity as pictures.

For each image: the target-class probability with the grey square at each position over the
photo, the per-pixel probability drop, the most probable class at each position (colours with
a legend), and, with ``--layer``, the total activation of one feature map. The command itself is
generated from the method registry (``convscope.cli.methods_cmd``), one image at a time with a
progress bar over the occluded copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convscope.cli.app import layer_record
from convscope.cli.methods_cmd import MethodWriter


def _normalised(values: Any) -> Any:
    import numpy as np

    array = np.asarray(values, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return np.zeros_like(array) if high <= low else (array - low) / (high - low)


class OcclusionWriter(MethodWriter):
    """``<image>_occlusion_{probability,drop,classes}.png`` (and ``_activation``, ``_activation_map``
    with ``--layer``), a record per image."""

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.classmap import class_map_picture, grid_to_image
        from convscope.render.colormaps import colorize
        from convscope.render.grids import upscale
        from convscope.render.overlay import overlay
        from convscope.render.pictures import display_image, occlusion_figures

        run, out = self.run, self.run.out
        assert out is not None
        (path,) = paths
        window, stride = run.options["window"], run.options["stride"]
        height, width = batch.shape[-2:]
        if result.stats.fallback:
            run.warn((f"--mode approximate: {result.stats.fallback}",))
        photo = display_image(run.loaded.preprocess, batch, 0)
        origins = (result.row_origins, result.col_origins)
        stem = out.stem(path)
        probability = grid_to_image(result.probability[0], origins, window, (height, width))
        activation = None
        if result.activation is not None and result.channels is not None:
            activation = grid_to_image(result.activation[0], origins, window, (height, width))
        if run.raw:
            pictures = {
                "probability": overlay(photo, _normalised(probability)),
                "drop": overlay(photo, _normalised(result.pixel_drop[0].clamp_min(0))),
                "classes": class_map_picture(result.top_class[0], result.class_names, origins, window,
                                             (height, width), photo=photo, highlight=int(result.targets[0])),
            }
            if activation is not None:
                pictures["activation"] = overlay(photo, _normalised(activation))
        else:
            pictures = occlusion_figures(photo, result, 0, run.loaded)
        files = [out.png(f"{stem}_occlusion_{key}.png", pictures[key], source=path)
                 for key in ("probability", "drop", "classes")]
        record: dict[str, Any] = {
            "image": str(path),
            "class": int(result.targets[0]),
            "label": result.labels[0],
            "clean_probability": float(result.clean_probability[0]),
            "lowest_probability": float(result.probability[0].min()),
            "grid": [len(result.row_origins), len(result.col_origins)],
            "window": window,
            "stride": stride,
            "fill": list(result.fill),
            "classes_shown": {result.class_names[c]: int((result.top_class[0] == c).sum())
                              for c in sorted(set(result.top_class[0].flatten().tolist()))},
            "mode": result.stats.mode,
            "work_fraction": round(result.stats.work_fraction, 4),
            "precision": result.stats.precision,
            "fallback": result.stats.fallback or None,
        }
        if activation is not None and result.activation is not None and result.channels is not None:
            files.append(out.png(f"{stem}_occlusion_activation.png", pictures["activation"], source=path))
            files.append(out.png(f"{stem}_occlusion_activation_map.png",
                                 upscale(colorize(_normalised(result.activation[0].numpy())), 224), source=path))
            record.update({
                **layer_record(run.loaded, run.layer or ""),
                "channel": int(result.channels[0]),
                "clean_activation": float(result.clean_activation[0]) if result.clean_activation is not None else None,
            })
        record["files"] = [f.name for f in files]
        run.records.append(record)

    def manifest(self) -> dict[str, Any]:
        run, options = self.run, self.run.options
        return {
            **run.basics, "class": run.class_index, "label": run.label,
            "window": options["window"], "stride": options["stride"], "fill": options["fill"],
            **(layer_record(run.loaded, run.layer) if run.layer else {"layer": None}),
            "channel": options["channel"],
            "cover_border": options["cover_border"], "mode": options["mode"], "batch_size": options["batch_size"],
        }
