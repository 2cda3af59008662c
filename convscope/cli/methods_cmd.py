"""The method commands, generated from the method registry (``convscope.methods.registry``).

One command per distinct ``cli.command`` of the table (classify, activations, features, filters,
gradcam, guided, saliency, deconv, occlusion, and any row added later). Its options come from the
rows:

- the image argument when the rows take images; ``--class/--label`` when they explain a class;
  ``--layer`` as the row's ``layer`` says (``"many"``: repeat or comma-separate, plus the hidden
  old ``--layers``);
- a selector for each ``fixed`` option of the rows (``gradcam --variant``), choices in registry
  order, the first row's value by default;
- every ``Param`` with a ``flag``, with its type, default, bounds and help; its value goes through
  ``Param.parse`` (one error line naming the option). Two wordings stay as the commands always had
  them: a number out of range is click's one-line "Input should be ..." (a ``Param`` with a
  ``unit`` is checked by ``parse`` instead, worded as the library words it), and a word outside a
  str parameter's choices is the method's own message;
- the shared ``-o -m -w --seed --device -b --json --raw`` as the row's ``CliBinding`` asks, and
  its ``extras``.

One body runs them all: expand the images, open the output folder and the model, run the method
over batches (or one image at a time, with a progress bar of the method's own units when the row
counts them), hand each result to the row's writer, then write ``<command>.json`` and the manifest,
print the records with ``--json``, and exit with 2 when some inputs failed.

The writer, ``MethodWriter``, writes what the row's renderer returns (``convscope.render.views``):
every view as ``<image>_<suffix>.png`` (its figure, or with ``--raw`` its bare picture), the
renderer's record per image and its stdout line, so a new method needs only its function, its
renderer and one row. A ``CliBinding.writer`` subclass is for a command that prints something of
its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convscope.cli.batch import finish, photo_of, run_batched, warn_once
from convscope.cli.common import (
    expand_images,
    layer_record,
    layer_records,
    open_model,
    reflow_help,
    split_layers,
)
from convscope.cli.errors import EXIT_USER_ERROR, print_error
from convscope.cli.options import (
    BatchSizeOpt,
    ClassOpt,
    DeviceOpt,
    ImagesArg,
    JsonOpt,
    LabelOpt,
    LayerOpt,
    LayersOpt,
    ModelOpt,
    OldLayersOpt,
    OutDirOpt,
    OutputIndexOpt,
    PrecisionOpt,
    RawOpt,
    SeedOpt,
    WeightsOpt,
    class_target,
    plural,
)
from convscope.cli.output import OutputDir, safe_name
from convscope.cli.progress import progress_bar
from convscope.errors import BadArgument, ConvscopeError, ImageError
from convscope.methods.registry import MethodSpec, Param, cli_commands

if TYPE_CHECKING:
    from convscope.render.views import ViewContext
    from convscope.types import LoadedModel

# Shared options a binding may ask for by name (``CliBinding.extras``): (parameter, annotation, default).
EXTRAS: dict[str, tuple[str, Any, Any]] = {"precision": ("precision", PrecisionOpt, "float32")}
LAYER_REQUIRED = "is required: name a layer alias or module path (see 'convscope layers')"


# ---------------------------------------------------------------- one run and its writer


@dataclass
class MethodRun:
    """What a writer knows about the command being run.

    Attributes:
        command: the sub-command; ``spec`` the row selected (``--variant``).
        selected: the fixed options of that row (``{"--variant": "gradcam++"}``).
        options: the row's typed parameter values.
        target: ``--class``/``--label`` as the method takes it; ``class_index``/``label`` as given.
        layer: ``--layer`` (a list or ``None`` for a ``"many"`` row), after the writer's default.
        batch_size: ``-b`` when the command has it.
        records: one JSON record per image (``<command>.json``); ``failures`` unreadable inputs.
    """

    command: str
    spec: MethodSpec
    loaded: Any
    out: OutputDir | None
    paths: list[Path]
    selected: dict[str, str]
    options: dict[str, Any]
    target: int | str | None = None
    class_index: int | None = None
    label: str | None = None
    layer: Any = None
    batch_size: int | None = None
    raw: bool = False
    json_out: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)
    failures: int = 0

    def warn(self, lines: tuple[str, ...] | list[str]) -> None:
        warn_once(lines, self.warned)

    @property
    def basics(self) -> dict[str, Any]:
        """``{"model", "weights"}`` for manifests."""
        return {"model": self.loaded.name, "weights": self.loaded.weights}


class MethodWriter:
    """Turns a method's results into files, JSON records, stdout lines and a manifest.

    This base class writes every view of the row's renderer (``convscope.render.views``): the
    figure, or the bare picture with ``--raw``, as ``<image>_<suffix>.png`` (``<suffix>.png`` for a
    method without images; a view without a suffix: ``<method>_<view key>``). Each image's record
    is ``{"image", <the renderer's record>, "files"}``, in ``<command>.json`` (with ``--json``: on
    stdout), and its stdout line the renderer's. A subclass is for a command that prints
    something of its own.
    """

    def __init__(self, run: MethodRun) -> None:
        self.run = run
        self.last_record: dict[str, Any] = {}
        self.written: list[Path] = []

    def choose_layer(self) -> Any:
        """The layer to run at (called once the model is open): ``--layer``, else the row's default."""
        run = self.run
        binding = run.spec.cli
        if not run.layer and binding is not None and binding.default_layer is not None:
            return binding.default_layer(run.loaded)
        return run.layer

    def compute(self, batch: Any, progress: Callable[[int], None] | None = None) -> Any:
        """The method's result for ``batch`` (``None`` for a method without images)."""
        run = self.run
        options = dict(run.options)
        keyword = run.spec.cli.batch_keyword if run.spec.cli else None
        if keyword and run.batch_size:
            options[keyword] = run.batch_size
        return run.spec.run(run.loaded, batch, target=run.target, layer=run.layer, options=options,
                            progress=progress, checked=True)

    def context(self, path: Path | None, batch: Any, index: int, probability: float | None) -> ViewContext:
        """What the renderer knows about image ``index`` of ``batch`` (``path``: its file)."""
        from convscope.render.views import ViewContext

        run, out = self.run, self.run.out

        def file_name(suffix: str) -> str:
            stem = "" if path is None else out.stem(path) if out is not None else path.stem
            return f"{stem}_{safe_name(suffix)}.png" if stem else f"{safe_name(suffix)}.png"

        # Without an output folder (classify) no picture is ever written, and records and
        # stdout lines never read the photo (0.9 s of 512 photos, batch 32, went to drawing it).
        photo = None if batch is None or out is None else photo_of(run.loaded, batch, index)
        return ViewContext(
            photo, model=run.loaded.name,
            weights=run.loaded.weights, index=index, loaded=run.loaded, title=run.spec.title, method=run.spec.name,
            probability=probability, layer=run.layer if isinstance(run.layer, str) else None, options=run.options,
            image="" if path is None else str(path), file_names=file_name, pictures=out is not None,
        )

    def write(self, paths: list[Path], batch: Any, result: Any) -> None:
        """Write the views and records of ``result`` (one per path; one for a method without images)."""
        run = self.run
        binding = run.spec.cli
        probabilities: list[float | None] = [None] * max(1, len(paths))
        if binding is not None and binding.probability and batch is not None:
            probabilities = list(_probabilities(run.loaded, batch, result.targets))
        render = run.spec.resolve_renderer()
        for i, path in enumerate(paths or [None]):
            context = self.context(path, batch, i, probabilities[i])
            views = render(result, context)
            run.warn(views.warnings)
            files = []
            if run.out is not None:
                for view in views.written:
                    name = context.file(view.suffix or f"{run.spec.name}_{view.key}")
                    files.append(run.out.png(name, view.picture if run.raw else view.figure, source=path, defer=True))
            self.written += files
            record: dict[str, Any] = {} if path is None else {"image": str(path)}
            record.update(views.record)
            if run.out is not None and views.lists_files:
                record["files"] = [f.name for f in files]
            elif record.get("files", ()) is None:
                del record["files"]
            self.last_record = record
            run.records.append(record)
            if not run.json_out:
                line = views.line
                if line is None:
                    shown = f" -> {', '.join(f.name for f in files)}" if files else ""
                    line = f"{path or run.spec.name}: {plural(len(views.written), 'picture')}{shown}"
                if line:
                    typer.echo(line)

    def failed(self, path: Path, exc: ImageError) -> None:
        """An input that could not be read (already reported on stderr): a command without an
        output folder, whose records are its output, records why."""
        if self.run.out is None:
            self.run.records.append({"image": str(path), "error": exc.reason})

    def manifest(self) -> dict[str, Any]:
        """The manifest's options: the model, the fixed options, the layer as the records name it
        (else as given), the target and the row's options, each under its flag's name."""

        run, spec = self.run, self.run.spec
        entries: dict[str, Any] = {**run.basics, **{_key(flag): value for flag, value in run.selected.items()}}
        if spec.layer == "many":
            entries["layers"] = layer_records(run.loaded, run.layer)
        elif spec.layer != "none":
            named: dict[str, Any] = {k: self.last_record[k] for k in ("layer", "module") if k in self.last_record}
            entries.update(named if len(named) == 2 else
                           layer_record(run.loaded, run.layer) if run.layer else {"layer": None})
        if spec.takes_target:
            as_class = spec.cli is not None and spec.cli.target_as == "class"
            entries.update({"class": run.class_index, "label": run.label} if as_class else {"target": run.target})
        entries.update({_key(p.flag) if p.flag else p.name: run.options[p.name] for p in spec.params})
        return entries

    def finish(self) -> None:
        """Records file, manifest, ``--json`` output, exit code."""
        run = self.run
        order = {str(p): i for i, p in enumerate(run.paths)}
        run.records.sort(key=lambda r: order.get(str(r.get("image")), 0))
        if run.out is None:
            if run.json_out:
                typer.echo(json.dumps(run.records, indent=2))
        elif run.spec.cli is None or run.spec.cli.json:
            finish(run.out, run.command, self.manifest(), run.records, run.json_out, run.failures)
        else:
            run.out.manifest(run.command, self.manifest())
            if run.spec.takes_images:
                typer.echo(f"wrote {plural(len(run.out.written), 'picture')} to {run.out.root}")
            else:
                for path in self.written:
                    typer.echo(f"wrote {path}")
        if run.failures:
            raise typer.Exit(EXIT_USER_ERROR)


def _key(flag: str) -> str:
    """``--cover-border`` -> ``cover_border``: an option as manifests name it."""
    return flag.lstrip("-").replace("-", "_")


def _probabilities(loaded: LoadedModel, batch: Any, targets: Any) -> list[float]:
    """Softmax probability of each image's explained class, for captions and JSON (one extra
    forward pass; the gradient methods only keep the logit)."""
    from convscope.methods.predict import classify

    predictions = classify(loaded, batch, topk=len(loaded.categories) or 1)
    out = []
    for prediction, target in zip(predictions, targets.tolist(), strict=True):
        found = (prediction.indices == int(target)).nonzero()
        out.append(float(prediction.probabilities[int(found[0, 0])]) if len(found) else float("nan"))
    return out


def _resolve_writer(spec: MethodSpec) -> type[MethodWriter]:
    writer = None if spec.cli is None else spec.cli.writer
    if writer is None:
        return MethodWriter
    if isinstance(writer, str):
        module_name, attribute = writer.split(":")
        writer = getattr(importlib.import_module(module_name), attribute)
    return writer  # type: ignore[return-value]


# ---------------------------------------------------------------- the generic body


def _select(command: str, rows: list[MethodSpec], values: dict[str, Any]) -> MethodSpec:
    for spec in rows:
        assert spec.cli is not None
        if all(values[_fixed_name(flag)] == value for flag, value in spec.cli.fixed.items()):
            return spec
    raise BadArgument(command, "no method matches these options")  # unreachable: the selectors check


def run_method_command(command: str, rows: list[MethodSpec], values: dict[str, Any]) -> None:
    """The body of every generated command: ``values`` are its parsed options by parameter name."""

    spec = _select(command, rows, values)
    binding = rows[0].cli
    assert binding is not None
    writer_class = _resolve_writer(spec)
    # parsed by the options' callbacks; a parameter without a flag takes its default
    options = {p.name: values.get(_param_name(p), p.default) for p in spec.params}
    class_index, label = values.get("class_index"), values.get("label")
    target = class_target(class_index, label) if spec.takes_target else None
    layer: Any = values.get("layer")
    if spec.layer == "many":
        layer = split_layers([*(layer or []), *(values.get("old_layers") or [])])
    elif spec.layer == "required" and not layer and (spec.cli or binding).default_layer is None:
        raise BadArgument("--layer", LAYER_REQUIRED)
    paths = expand_images(values["images"]) if spec.takes_images else []
    out = OutputDir(values["output"], inputs=paths) if binding.output else None
    loaded = open_model(values["model"], values["weights"], values["seed"], values["device"],
                        values.get("precision", "float32"), values.get("output_index"))
    run = MethodRun(
        command=command, spec=spec, loaded=loaded, out=out, paths=paths,
        selected={flag: values[_fixed_name(flag)] for flag in spec.cli.fixed} if spec.cli else {},
        options=options, target=target, class_index=class_index, label=label, layer=layer,
        batch_size=values.get("batch_size") if binding.batch_size is not None else None,
        raw=bool(values.get("raw", False)), json_out=bool(values.get("json_out", False)),
    )
    writer = writer_class(run)
    run.layer = writer.choose_layer()
    if not spec.takes_images:
        writer.write([], None, writer.compute(None))
    elif run.batch_size is not None:
        description = next(iter(run.selected.values()), command)

        def failed(path: Path, exc: ImageError) -> None:
            writer.failed(path, exc)

        run.failures = run_batched(paths, loaded, run.batch_size, description,
                                   lambda chunk, batch: writer.write(chunk, batch, writer.compute(batch)), failed)
    else:
        run.failures = _one_at_a_time(run, writer)
    writer.finish()


def _one_at_a_time(run: MethodRun, writer: MethodWriter) -> int:
    """Each image alone: a bar over the images, or, for a row that counts its work units, a bar
    over one image's units. A bad layer or option fails the same way for every image: it ends the run."""
    loaded, spec = run.loaded, run.spec
    counted = spec.progress and spec.units is not None
    failures = 0
    bar = contextlib.nullcontext(lambda n=1: None) if counted else progress_bar(len(run.paths), run.command, unit="img")
    with bar as advance_images:
        for path in run.paths:
            try:
                batch = loaded.preprocess.to_tensor(loaded.preprocess.load_image(path)).to(loaded.device)
                if counted:
                    height, width = batch.shape[-2:]
                    total = spec.work_units(run.options, int(height), int(width), checked=True) or None
                    with progress_bar(total, f"{run.command} {path.name}", unit="copy") as advance:
                        result = writer.compute(batch, advance)
                else:
                    result = writer.compute(batch)
                writer.write([path], batch, result)
            except ConvscopeError as exc:
                if not isinstance(exc, ImageError):
                    raise
                failures += 1
                print_error(exc)
                writer.failed(path, exc)
            advance_images(1)
    return failures


# ---------------------------------------------------------------- building the commands


def _param_name(param: Param) -> str:
    return "param_" + param.name


def _fixed_name(flag: str) -> str:
    return "fixed_" + flag.lstrip("-").replace("-", "_")


def _param_option(param: Param, aliases: dict[str, str]) -> tuple[Any, Any]:
    """``(annotation, default)`` of a parameter's option: its type, bounds and help; the value
    checked by ``Param.parse``."""
    assert param.flag is not None
    python_type: Any = {"int": int, "float": float, "bool": bool}.get(param.type, str)
    if param.multiple:
        python_type = list[python_type] | None  # type: ignore[valid-type]
    elif param.optional:
        python_type = python_type | None
    names = [param.flag, *([aliases[param.flag]] if param.flag in aliases else [])]
    bounds: dict[str, Any] = {}
    if param.type in ("int", "float") and param.unit is None:
        # click's range check: its one-line "Input should be ..." error, as the commands always had
        bounds = {"min": param.minimum, "max": param.maximum}

    # A word outside a str parameter's choices is left to the method, whose message the commands
    # always printed ("--location mean: must be 'max' or 'all'").
    parse = dataclasses.replace(param, choices=None).parse if param.type == "str" else param.parse

    def check(value: Any) -> Any:
        return parse(value)

    option = typer.Option(*names, help=param.help, callback=check, **bounds)
    default = None if param.multiple else param.default
    return Annotated[python_type, option], default


def _selector_option(flag: str, rows: list[MethodSpec]) -> tuple[Any, Any]:
    choices = [(spec.cli.fixed[flag], spec.title) for spec in rows if spec.cli and flag in spec.cli.fixed]
    names = [value for value, _ in choices]
    described = [f"{value} ({title})" for value, title in choices]
    text = ", ".join(described[:-1]) + " or " + described[-1] if len(described) > 1 else described[0]

    # Old spellings of a choice (``gradcam++``) still work; they are listed nowhere.
    hidden = {alias: spec.cli.fixed[flag] for spec in rows if spec.cli and flag in spec.cli.fixed
              for alias in spec.aliases}

    def check(value: str) -> str:
        value = hidden.get(value, value)
        if value not in names:
            raise BadArgument(f"{flag} {value}", "must be one of " + ", ".join(names))
        return value

    return Annotated[str, typer.Option(flag, help=f"Method: {text}.", callback=check)], names[0]


def command_parameters(rows: list[MethodSpec]) -> list[inspect.Parameter]:
    """The generated command's parameters, in ``--help`` order."""
    first = rows[0]
    binding = first.cli
    assert binding is not None
    entries: list[tuple[str, Any, Any]] = []
    if first.takes_images:
        entries.append(("images", ImagesArg, inspect.Parameter.empty))
    if first.layer == "required":  # the command is about a layer: its option comes first
        entries.append(("layer", LayerOpt, None))
    if binding.output:
        entries.append(("output", OutDirOpt, Path("convscope-out")))
    entries += [("model", ModelOpt, None), ("weights", WeightsOpt, None), ("seed", SeedOpt, 0),
                ("device", DeviceOpt, "auto"), ("output_index", OutputIndexOpt, None)]
    if any(spec.takes_target for spec in rows):
        entries += [("class_index", ClassOpt, None), ("label", LabelOpt, None)]
    if first.layer == "many":
        entries += [("layer", LayersOpt, None), ("old_layers", OldLayersOpt, None)]
    elif first.layer == "optional":
        entries.append(("layer", LayerOpt, None))
    seen: set[str] = set()
    for spec in rows:
        for param in spec.params:
            if param.flag and param.flag not in seen:
                seen.add(param.flag)
                entries.append((_param_name(param), *_param_option(param, dict(binding.aliases))))
    for flag in dict.fromkeys(flag for spec in rows if spec.cli for flag in spec.cli.fixed):
        entries.append((_fixed_name(flag), *_selector_option(flag, rows)))
    if binding.batch_size is not None:
        entries.append(("batch_size", BatchSizeOpt, binding.batch_size))
    if binding.json:
        entries.append(("json_out", JsonOpt, False))
    if binding.raw:
        entries.append(("raw", RawOpt, False))
    entries += [EXTRAS[name] for name in binding.extras]
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for name, annotation, default in entries]


def _command_function(command: str, rows: list[MethodSpec]) -> Callable[..., None]:
    def method_command(**values: Any) -> None:
        run_method_command(command, rows, values)

    method_command.__signature__ = inspect.Signature(command_parameters(rows))  # type: ignore[attr-defined]
    method_command.__annotations__ = {}
    method_command.__name__ = method_command.__qualname__ = f"{command.replace('-', '_')}_command"
    method_command.generated = True  # type: ignore[attr-defined]
    return method_command


# The apps the method commands were built on (the last one is rebuilt when no target is given).
_BUILT_ON: list[typer.Typer] = []


def register_method_commands(target: typer.Typer | None = None) -> list[str]:
    """(Re)build one command per ``cli.command`` of the registry on ``target``; return their names.

    Commands built earlier are replaced, so a test can register a row and call this again. The new
    commands go where the first generated one was (after ``layers`` at start-up). ``target``:
    the app this was last called with (``convscope.cli.main`` calls it once the app is built), so a
    test can rebuild the real app's commands without importing ``main`` back."""
    if target is None:
        if not _BUILT_ON:
            raise RuntimeError("register_method_commands(): no app yet; convscope.cli.main builds it")
        target = _BUILT_ON[-1]
    elif target not in _BUILT_ON:
        _BUILT_ON.append(target)
    old = [i for i, info in enumerate(target.registered_commands)
           if getattr(info.callback, "generated", False)]
    position = old[0] if old else next(
        (i + 1 for i, info in enumerate(target.registered_commands) if info.name == "layers"),
        len(target.registered_commands))
    for i in reversed(old):
        del target.registered_commands[i]
    names = []
    for command, rows in cli_commands().items():
        binding = rows[0].cli
        assert binding is not None
        help_text = reflow_help(binding.help or rows[0].summary)
        target.command(command, help=help_text)(_command_function(command, rows))
        names.append(command)
    built = target.registered_commands[-len(names):] if names else []
    del target.registered_commands[len(target.registered_commands) - len(built):]
    target.registered_commands[position:position] = built
    return names
