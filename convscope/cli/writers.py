"""Writers of the ``classify``, ``activations``, ``features`` and ``filters`` commands.

The commands themselves are generated from the method registry (``convscope.cli.methods_cmd``);
these classes write what each one always wrote: the same file names, JSON, stdout and manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from convscope.cli.app import layer_record, layer_records
from convscope.cli.errors import EXIT_USER_ERROR
from convscope.cli.methods_cmd import MethodWriter
from convscope.cli.options import plural
from convscope.cli.output import safe_name
from convscope.errors import BadArgument, ImageError


class ClassifyWriter(MethodWriter):
    """A top-k table per image on stdout (or, with ``--json``, all of them in input order); no files."""

    def compute(self, batch: Any, progress: Any = None) -> Any:
        from convscope.methods.predict import classify

        run = self.run
        return classify(run.loaded, batch, topk=run.options["topk"], batch_size=run.batch_size or 32)

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.text import predictions_table

        for path, prediction in zip(paths, result, strict=True):
            self.run.records.append({"image": str(path), "predictions": prediction.as_dicts()})
            if not self.run.json_out:
                typer.echo(predictions_table(str(path), prediction))

    def failed(self, path: Path, exc: ImageError) -> None:
        self.run.records.append({"image": str(path), "error": exc.reason})

    def finish(self) -> None:
        run = self.run
        if run.json_out:
            order = {str(p): i for i, p in enumerate(run.paths)}
            run.records.sort(key=lambda r: order.get(r["image"], 0))
            typer.echo(json.dumps(run.records, indent=2))
        if run.failures:
            raise typer.Exit(EXIT_USER_ERROR)


class _PictureWriter(MethodWriter):
    """Pictures only: no records file; ``wrote N pictures to <folder>``."""

    def finish(self) -> None:
        run = self.run
        assert run.out is not None
        run.out.manifest(run.command, self.manifest())
        typer.echo(f"wrote {plural(len(run.out.written), 'picture')} to {run.out.root}")
        if run.failures:
            raise typer.Exit(EXIT_USER_ERROR)


class ActivationsWriter(_PictureWriter):
    """``<image>_<layer>.png`` per layer and ``<image>_activations.png`` (all layers in one strip)."""

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.pictures import (
            activation_figure,
            activation_pictures,
            activation_strip,
            display_image,
        )

        run, out = self.run, self.run.out
        assert out is not None
        for path in paths:
            photo = display_image(run.loaded.preprocess, batch)
            stem = out.stem(path)
            for name, picture in activation_pictures(photo, result).items():
                shown = picture if run.raw else activation_figure(photo, result, name, model=run.loaded)
                out.png(f"{stem}_{safe_name(name)}.png", shown, source=path)
            out.png(f"{stem}_activations.png", activation_strip(photo, result, model=run.loaded, captioned=not run.raw),
                    source=path)

    def manifest(self) -> dict[str, Any]:
        return {**self.run.basics, "layers": layer_records(self.run.loaded, self.run.layer)}


class FeaturesWriter(_PictureWriter):
    """``<image>_features_<layer>.png``: the layer's channels as tiles (default layer: the first stage)."""

    picks_layer = True

    def choose_layer(self) -> Any:
        name = self.run.layer or next(iter(self.run.loaded.stages), "")
        if not name:
            raise BadArgument("--layer", "this model has no conv stages; name a layer")
        return name

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.pictures import feature_figure, feature_grid

        run, out = self.run, self.run.out
        assert out is not None
        for path in paths:
            picture = feature_grid(result) if run.raw else feature_figure(result, model=run.loaded,
                                                                           order=run.options["order"])
            out.png(f"{out.stem(path)}_features_{safe_name(run.layer)}.png", picture, source=path)

    def manifest(self) -> dict[str, Any]:
        run = self.run
        return {**run.basics, **layer_record(run.loaded, run.layer), "max": run.options["max_channels"],
                "order": run.options["order"]}


class FiltersWriter(MethodWriter):
    """``filters_<module>.png``: the kernels of one convolution."""

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        from convscope.render.pictures import filter_figure, filter_grid

        run = self.run
        assert run.out is not None
        picture = filter_grid(result) if run.raw else filter_figure(result, model=run.loaded)
        self.path = run.out.png(f"filters_{safe_name(result.layer)}.png", picture)
        self.record = {"layer": run.layer or result.layer, "module": result.layer}

    def finish(self) -> None:
        run = self.run
        assert run.out is not None
        run.out.manifest("filters", {**run.basics, **self.record})
        typer.echo(f"wrote {self.path}")
