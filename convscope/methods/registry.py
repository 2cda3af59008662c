"""Method registry: one ``MethodSpec`` row per thing convscope can show about an image.

A row says which library function computes the method, which standard inputs it takes (the
image batch, a layer, a target class, a progress callback), its own options with their types,
defaults and choices, which renderer turns its result into captioned pictures and JSON, and
whether it is fast (one or two passes) or slow (hundreds of passes: run as a cancellable job).

The CLI's option choices, the HTML report's sections and the web app's method menu and form are
read from this table, so a method is added by writing its function and one row here.

The module is deliberately light: functions and renderers are *dotted names*
(``"convscope.methods.gradcam:gradcam"``) resolved on first use. That keeps ``methods/`` free of
PIL and matplotlib (renderers live in ``render/``), and lets the web app build its form, or a
command its ``--help``, without importing torch.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from convscope.errors import BadArgument, UnknownMethod, close_matches

PARAM_TYPES = ("int", "float", "str", "bool", "fill")
COSTS = ("fast", "slow")
LAYER_USES = ("none", "optional", "required", "many")

# The occluder colours a user can name; any number is also accepted (normalised input space).
FILL_NAMES = ("grey", "black", "white")


@dataclass(frozen=True)
class Param:
    """One option of a method.

    Attributes:
        name: keyword argument of the method's function (also the web form field and JSON key).
        type: ``"int"``, ``"float"``, ``"str"``, ``"bool"``, or ``"fill"`` (a colour name from
            ``choices`` or any finite number).
        default: the value when the option is not given (the CLI's default).
        help: one sentence for ``--help``, tooltips and the API docs.
        choices: the allowed strings (``str`` and ``fill`` types).
        minimum, maximum: bounds for numbers (inclusive).
        flag: the CLI option spelling (``"--max"``), or ``None`` when the CLI has no such option.
        optional: ``None`` is a valid value (``channel``: "let the method choose").
        multiple: the value is a list of the type (a repeatable CLI option; a form's
            comma-separated text); ``None`` or empty is the default.
        unit: what a number counts (``"pixels"``): bad values read "must be a whole number of
            pixels, at least 1", as the library words them. The CLI checks such a number through
            ``parse`` only (not with click's range), so both say the same.
    """

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    flag: str | None = None
    optional: bool = False
    multiple: bool = False
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name}: type must be one of {PARAM_TYPES}, not {self.type!r}")

    @property
    def subject(self) -> str:
        return self.flag or self.name

    def parse(self, raw: Any) -> Any:
        """A raw value (a form string, a JSON value, a Python value) -> the typed value.

        Raises:
            BadArgument: naming the option and what it accepts.
        """
        if self.multiple:
            items = raw.split(",") if isinstance(raw, str) else list(raw or ())
            values = [self._parse_one(item) for item in items if not (isinstance(item, str) and not item.strip())]
            return values or (None if self.optional else self.default)
        return self._parse_one(raw)

    def _parse_one(self, raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            if self.optional:
                return None
            return self.default
        text = raw.strip() if isinstance(raw, str) else raw
        if self.type == "bool":
            if isinstance(text, bool):
                return text
            folded = str(text).lower()
            if folded in ("1", "true", "yes", "on"):
                return True
            if folded in ("0", "false", "no", "off"):
                return False
            raise BadArgument(f"{self.subject} {raw}", "must be true or false")
        if self.type == "int":
            try:
                if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
                    raise ValueError
                value: Any = int(text)
            except (TypeError, ValueError):
                raise BadArgument(f"{self.subject} {raw}", self._whole_number()) from None
            return self._bounded(value, raw)
        if self.type == "float":
            try:
                value = float(text)
            except (TypeError, ValueError):
                raise BadArgument(f"{self.subject} {raw}", "must be a number") from None
            if not math.isfinite(value):
                raise BadArgument(f"{self.subject} {raw}", "must be a finite number")
            return self._bounded(value, raw)
        if self.type == "fill":
            folded = str(text).lower()
            if folded == "gray":
                folded = "grey"
            if self.choices and folded in self.choices:
                return folded
            try:
                number = float(folded)
            except ValueError:
                raise BadArgument(
                    f"{self.subject} {raw}", f"is not {', '.join(self.choices or ())} or a number"
                ) from None
            if not math.isfinite(number):
                names = ", ".join(self.choices or ())
                raise BadArgument(f"{self.subject} {raw}", f"must be {names + ' or ' if names else ''}a finite number")
            return number
        value = str(text)
        if self.choices is not None and value not in self.choices:
            raise BadArgument(f"{self.subject} {raw}", "is not one of " + ", ".join(self.choices))
        return value

    def _whole_number(self) -> str:
        if self.unit is None:
            return "must be a whole number"
        return f"must be a whole number of {self.unit}" + (f", at least {self.minimum:g}" if self.minimum is not None else "")

    def _bounded(self, value: float, raw: Any) -> Any:
        if self.minimum is not None and value < self.minimum:
            if self.unit is not None and self.type == "int":
                raise BadArgument(f"{self.subject} {raw}", self._whole_number())
            raise BadArgument(f"{self.subject} {raw}", f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise BadArgument(f"{self.subject} {raw}", f"must be at most {self.maximum:g}")
        return value

    def schema(self) -> dict[str, Any]:
        """JSON description (web form, ``/api/methods``)."""
        return {
            "name": self.name, "type": self.type, "default": self.default, "help": self.help,
            "choices": list(self.choices) if self.choices is not None else None,
            "minimum": self.minimum, "maximum": self.maximum, "optional": self.optional, "flag": self.flag,
            "multiple": self.multiple,
        }


@dataclass(frozen=True)
class CliBinding:
    """Where a method lives on the command line.

    The command is generated by ``convscope.cli.methods_cmd`` from the rows that name it. Its
    command-wide settings (help, batch size, shared options) are read from the first such row;
    ``writer`` is per row.

    Attributes:
        command: the ``convscope`` sub-command.
        fixed: options the command needs to run exactly this method (``{"--variant": "guided"}``);
            the first row's value is the option's default.
        help: the command's ``--help`` text (a docstring: paragraphs, "Writes ..." and an
            "Examples:" line with ``|`` between examples).
        batch_size: default of ``--batch-size/-b`` (images per forward pass); ``None``: no such
            option, the images go through one at a time.
        writer: ``"module:attribute"`` of a ``convscope.cli.methods_cmd.MethodWriter`` class that
            writes this method's files, JSON records, stdout lines and manifest; ``None``: the
            default writer (each of the renderer's pictures as ``<image>_<method>_<view>.png``,
            their records in ``<command>.json``).
        output, json, raw: the command has ``--output/-o``, ``--json``, ``--raw``.
        extras: further shared CLI options by name (``"precision"``: ``--precision``).
        aliases: short spellings of parameter flags (``{"--topk": "-k"}``).
    """

    command: str
    fixed: Mapping[str, str] = field(default_factory=dict)
    help: str = ""
    batch_size: int | None = None
    writer: str | None = None
    output: bool = True
    json: bool = True
    raw: bool = True
    extras: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """Everything convscope knows about one method.

    Attributes:
        name: registry key, as typed in ``/api/explain``'s ``method`` field.
        title: human name for menus and report headings.
        summary: one sentence: what the pictures show.
        function: ``"module:attribute"`` of the library function. It is called as
            ``function(model, [batch,] [target=...,] [layer=.../layers=...,] **options
            [, progress=...])`` according to the flags below.
        renderer: ``"module:attribute"`` of a ``render`` function ``(result, context) -> Views``.
        cost: ``"fast"`` (a few passes) or ``"slow"`` (many: a job with progress in the web app).
        params: the method's own options.
        takes_images: the function takes the image batch (filters does not).
        takes_target: the function explains a class (``target=``: index, label or ``None``).
        layer: ``"none"``, ``"optional"`` (a default layer exists), ``"required"``, or
            ``"many"`` (a list of layers, passed as ``layers=``).
        layer_kind: what the layer picker should offer: ``"conv"`` (any 4-D layer).
        progress: the function takes ``progress=`` (called with units done).
        hooks: the method attaches hooks, rules or swaps modules while it runs, so it needs the
            model to itself (the web app's per-model lock).
        cli: where the method is on the command line.
        units: ``"module:attribute"`` of ``(options, height, width) -> int``: how many progress
            units a run reports in all (for a progress bar), or ``None``.
    """

    name: str
    title: str
    summary: str
    function: str
    renderer: str
    cost: str = "fast"
    params: tuple[Param, ...] = ()
    takes_images: bool = True
    takes_target: bool = False
    layer: str = "none"
    progress: bool = False
    hooks: bool = True
    cli: CliBinding | None = None
    units: str | None = None

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"method {self.name}: cost must be one of {COSTS}")
        if self.layer not in LAYER_USES:
            raise ValueError(f"method {self.name}: layer must be one of {LAYER_USES}")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def parse_options(self, raw: Mapping[str, Any], *, strict: bool = False) -> dict[str, Any]:
        """Typed option values for every parameter: from ``raw`` where given, else the default.

        Args:
            strict: reject keys that are not parameters of this method (an API caller's typo).
        """
        if strict:
            known = {p.name for p in self.params}
            unknown = sorted(k for k in raw if k not in known)
            if unknown:
                raise BadArgument(
                    unknown[0], f"is not an option of {self.name}",
                    "options: " + (", ".join(sorted(known)) or "none"),
                )
        return {p.name: p.parse(raw.get(p.name)) for p in self.params}

    def resolve_function(self) -> Callable[..., Any]:
        return _resolve(self.function)

    def resolve_renderer(self) -> Callable[..., Any]:
        return _resolve(self.renderer)

    def run(
        self,
        model: Any,
        batch: Any = None,
        *,
        target: Any = None,
        layer: str | Sequence[str] | None = None,
        options: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        checked: bool = False,
    ) -> Any:
        """Call the method's function with the standard inputs this row declares.

        ``options`` are typed values (see ``parse_options``); missing ones take their defaults.
        ``layer`` may be a list for a ``"many"`` row. ``checked``: the caller has parsed the
        options already (the CLI: its own checks stand), they are passed as given.
        """
        if checked:
            values = {p.name: p.default for p in self.params} | dict(options or {})
        else:
            values = self.parse_options(options or {})
        args: list[Any] = [model]
        if self.takes_images:
            args.append(batch)
        keywords: dict[str, Any] = dict(values)
        if self.takes_target:
            keywords["target"] = target
        if self.layer == "many":
            keywords["layers"] = ([layer] if isinstance(layer, str) else list(layer)) if layer else None
        elif isinstance(layer, (list, tuple)):
            raise BadArgument("layer", f"{self.name} takes one layer")
        elif self.layer in ("optional", "required"):
            if self.layer == "required" and not layer:
                raise BadArgument("layer", f"is required by {self.name}: name a layer alias or module path")
            keywords["layer"] = layer or None
        if self.progress and progress is not None:
            keywords["progress"] = progress
        return self.resolve_function()(*args, **keywords)

    def work_units(self, options: Mapping[str, Any], height: int, width: int, *, checked: bool = False) -> int | None:
        """How many units ``progress`` will report in all, when the row knows (``checked``: as in ``run``)."""
        if self.units is None:
            return None
        values = {p.name: p.default for p in self.params} | dict(options) if checked else self.parse_options(options)
        return int(_resolve(self.units)(values, height, width))

    def schema(self) -> dict[str, Any]:
        """JSON description (``/api/methods``, the web form)."""
        return {
            "name": self.name, "title": self.title, "summary": self.summary, "cost": self.cost,
            "takes_target": self.takes_target, "layer": self.layer, "takes_images": self.takes_images,
            "params": [p.schema() for p in self.params],
            "cli": None if self.cli is None else {"command": self.cli.command, "fixed": dict(self.cli.fixed)},
        }


def _resolve(dotted: str) -> Callable[..., Any]:
    module_name, attribute = dotted.split(":")
    return getattr(importlib.import_module(module_name), attribute)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the table

_CAM_LAYER_HELP = "Conv layer (default: the model's last conv stage)."

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a row; names must be unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up; unknown names raise ``UnknownMethod`` with close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(f"method {name}", "unknown method", close_matches(name, list_methods())) from None


def unregister_method(name: str) -> None:
    """Remove a row (tests that register a temporary method)."""
    _REGISTRY.pop(name, None)


@contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """``with registered(row):`` the row is in the table, and gone afterwards."""
    register_method(spec)
    try:
        yield spec
    finally:
        unregister_method(spec.name)


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def cli_commands() -> dict[str, list[MethodSpec]]:
    """Each CLI command of the table with its rows, in registry order."""
    commands: dict[str, list[MethodSpec]] = {}
    for spec in _REGISTRY.values():
        if spec.cli is not None:
            commands.setdefault(spec.cli.command, []).append(spec)
    return commands


def cli_choices(command: str, flag: str) -> tuple[str, ...]:
    """The values of ``flag`` that select a method of ``command`` (``gradcam --variant``), or a
    parameter's choices (``occlusion --mode``), in registry order: the CLI's single source."""
    fixed = [s.cli.fixed[flag] for s in _REGISTRY.values() if s.cli and s.cli.command == command and flag in s.cli.fixed]
    if fixed:
        return tuple(fixed)
    for spec in _REGISTRY.values():
        if spec.cli and spec.cli.command == command:
            for p in spec.params:
                if p.flag == flag and p.choices is not None:
                    return p.choices
    raise KeyError(f"{command} {flag}")


def occlusion_units(options: Mapping[str, Any], height: int, width: int) -> int:
    """Occluded copies of one image: window positions along each axis, multiplied."""
    from convscope.methods.occlusion import grid_origins

    window, stride, border = int(options["window"]), int(options["stride"]), bool(options["cover_border"])
    if window > min(height, width):
        return 0
    return len(grid_origins(height, window, stride, border)) * len(grid_origins(width, window, stride, border))


def deconv_units(options: Mapping[str, Any], height: int, width: int) -> int:
    """Projections of one image: the chosen channel, or the ``top`` strongest."""
    channel = options.get("channel")
    if channel is None:
        return int(options["top"])
    return len(channel) if isinstance(channel, (list, tuple)) else 1


TOPK = Param("topk", "int", 5, "Classes per image.", minimum=1, maximum=1000, flag="--topk")

# The CLI commands' help: what the command writes and examples (reflowed for --help by the CLI).
_CLASSIFY_HELP = """Top-k ImageNet (or checkpoint) classes with probabilities, for files and folders.

Examples: convscope classify cat.jpg | convscope classify photos/ --topk 3 --json
| convscope classify photos/ --precision bf16
"""
_ACTIVATIONS_HELP = """Activation maps: the mean of each conv stage's rectified output, in jet over the photo.

Writes <image>_<layer>.png per layer and <image>_activations.png (all layers in one strip),
all captured in one forward pass per image. Each picture is captioned (model, weights,
layer) with a colour bar of the real values; --raw writes the bare overlays.

Example: convscope activations cat.jpg --model alexnet --weights random -o out/
"""
_FEATURES_HELP = """Feature-map grid: the channels of one layer as grayscale tiles, captioned with the channel index.

Example: convscope features cat.jpg --layer stage2 --max 32 --order activation -o out/
"""
_FILTERS_HELP = """Convolution kernels as tiles (first layer: RGB; deeper: each filter's strongest input).

A stage alias (conv2, stage3) means the convolution that makes that stage's output.

Examples:
convscope filters -o out/
convscope filters -m alexnet -w random --layer conv2
"""
_GRADCAM_HELP = """Grad-CAM: where in the photo the evidence for a class is, at a conv layer (default: the last).

Writes <image>_gradcam.png (the map in jet over the photo, 0.6/0.4) and
<image>_gradcam_map.png (the map alone; gradcampp for --variant gradcam++); --variant guided
also writes the guided Grad-CAM picture <image>_guided_gradcam.png.

Examples: convscope gradcam cat.jpg -o out/ | convscope gradcam cat.jpg --label "tiger cat" --layer stage6 |
convscope gradcam photos/ -m vgg16 -w random --variant gradcam++
"""
_GUIDED_HELP = """Guided backprop: the input gradient with only positive signals passed back through each ReLU.

Writes <image>_guided.png (signed, grey = 0) and <image>_guided_magnitude.png (largest
|gradient| over colours, in jet over the photo). Activations without a rule (SiLU, GELU...)
are named in a warning.

Examples: convscope guided cat.jpg -o out/ | convscope guided cat.jpg --class 281 --model vgg16 --weights random
"""
_SALIENCY_HELP = """Saliency (Simonyan et al.): the largest |gradient of the class score| over colours, per pixel.

Writes <image>_saliency.png (grey) and <image>_saliency_magnitude.png (in jet over the photo).

Examples: convscope saliency cat.jpg -o out/ | convscope saliency photos/ --label espresso
"""
_DECONV_HELP = """Deconvnet (Zeiler & Fergus): project a layer's strongest activations back to pixels.

For each projection writes <image>_<layer>_ch<C>.png (full size, grey = 0) and
<image>_<layer>_ch<C>_crop.png (the projection cropped to the receptive field, next to the
image patch under it); <image>_<layer>_deconv.png shows all of them in one grid.

Examples: convscope deconv cat.jpg --layer conv5 -m alexnet -w random -o out/ |
convscope deconv cat.jpg --layer stage4 --channel 7 --channel 12 --location all
"""
_OCCLUSION_HELP = """Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): slide a grey square over the photo.

Writes <image>_occlusion_probability.png (target probability with the square at each
position, over the photo: blue = hiding that spot hurts), <image>_occlusion_drop.png
(per-pixel probability drop, captum's Occlusion map), <image>_occlusion_classes.png (the most
probable class at each position, with a legend), and with --layer
<image>_occlusion_activation.png (total activation of one feature map at each position).

Examples: convscope occlusion cat.jpg -o out/ | convscope occlusion cat.jpg --label tabby --window 32 --stride 16 |
convscope occlusion cat.jpg -m alexnet -w random --layer conv5 --fill black
"""
_GRADCAM_WRITER = "convscope.cli.explain:GradcamWriter"

register_method(MethodSpec(
    name="classify",
    title="Top-5 classes",
    summary="The classes the network finds most probable, with softmax probabilities.",
    function="convscope.methods.predict:classify",
    renderer="convscope.render.views:prediction_views",
    params=(TOPK,),
    hooks=False,
    cli=CliBinding("classify", help=_CLASSIFY_HELP, batch_size=32, writer="convscope.cli.writers:ClassifyWriter",
                   output=False, raw=False, extras=("precision",), aliases={"--topk": "-k"}),
))
register_method(MethodSpec(
    name="activations",
    title="Activation maps",
    summary="The mean of each conv stage's rectified output, in jet over the photo.",
    function="convscope.methods.activations:activation_maps",
    renderer="convscope.render.views:activation_views",
    layer="many",
    cli=CliBinding("activations", help=_ACTIVATIONS_HELP, writer="convscope.cli.writers:ActivationsWriter",
                   json=False),
))
register_method(MethodSpec(
    name="features",
    title="Feature maps",
    summary="The channels of one layer as grayscale tiles, captioned with the channel index.",
    function="convscope.methods.activations:feature_maps",
    renderer="convscope.render.views:feature_views",
    layer="required",
    params=(
        Param("max_channels", "int", 64, "How many channels to show.", minimum=1, maximum=4096, flag="--max"),
        Param("order", "str", "index", "index: the first channels; activation: the most active.",
              choices=("index", "activation"), flag="--order"),
    ),
    cli=CliBinding("features", help=_FEATURES_HELP, writer="convscope.cli.writers:FeaturesWriter", json=False),
))
register_method(MethodSpec(
    name="filters",
    title="Filters",
    summary="The kernels of a convolution as tiles (first layer: RGB).",
    function="convscope.methods.filters:conv_filters",
    renderer="convscope.render.views:filter_views",
    takes_images=False,
    layer="optional",
    hooks=False,
    cli=CliBinding("filters", help=_FILTERS_HELP, writer="convscope.cli.writers:FiltersWriter", json=False),
))
register_method(MethodSpec(
    name="gradcam",
    title="Grad-CAM",
    summary="Where in the photo the evidence for a class is, at a conv layer.",
    function="convscope.methods.gradcam:gradcam",
    renderer="convscope.render.views:cam_views",
    takes_target=True,
    layer="optional",
    cli=CliBinding("gradcam", {"--variant": "gradcam"}, help=_GRADCAM_HELP, batch_size=16, writer=_GRADCAM_WRITER),
))
register_method(MethodSpec(
    name="gradcam++",
    title="Grad-CAM++",
    summary="Grad-CAM with positive gradients weighted per location: spreads over several instances.",
    function="convscope.methods.gradcam:gradcam_plus_plus",
    renderer="convscope.render.views:cam_views",
    takes_target=True,
    layer="optional",
    cli=CliBinding("gradcam", {"--variant": "gradcam++"}, writer=_GRADCAM_WRITER),
))
register_method(MethodSpec(
    name="guided-gradcam",
    title="Guided Grad-CAM",
    summary="Guided backprop times Grad-CAM: fine detail, only where the class evidence is.",
    function="convscope.methods.gradcam:guided_gradcam",
    renderer="convscope.render.views:guided_gradcam_views",
    takes_target=True,
    layer="optional",
    cli=CliBinding("gradcam", {"--variant": "guided"}, writer=_GRADCAM_WRITER),
))
register_method(MethodSpec(
    name="guided",
    title="Guided backprop",
    summary="The input gradient with only positive signals passed back through each ReLU.",
    function="convscope.methods.guided:guided_backprop",
    renderer="convscope.render.views:guided_views",
    takes_target=True,
    cli=CliBinding("guided", help=_GUIDED_HELP, batch_size=16, writer="convscope.cli.explain:InputGradientWriter"),
))
register_method(MethodSpec(
    name="saliency",
    title="Saliency",
    summary="The largest |gradient of the class score| over colours, per pixel.",
    function="convscope.methods.guided:saliency",
    renderer="convscope.render.views:saliency_views",
    takes_target=True,
    cli=CliBinding("saliency", help=_SALIENCY_HELP, batch_size=16, writer="convscope.cli.explain:InputGradientWriter"),
))
register_method(MethodSpec(
    name="deconv",
    title="Deconvnet projections",
    summary="A layer's strongest activations projected back to pixels (Zeiler & Fergus).",
    function="convscope.methods.deconvnet:deconv",
    renderer="convscope.render.views:deconv_views",
    layer="required",
    progress=True,
    params=(
        Param("channel", "int", None, "Feature map(s) to project; repeat for several "
              "(default: the --top strongest in each image).", minimum=0, flag="--channel", optional=True,
              multiple=True),
        Param("top", "int", 9, "How many of the strongest channels.", minimum=1, maximum=64, flag="--top"),
        Param("location", "str", "max", "max: only the channel's strongest activation (as in the paper); "
              "all: its whole feature map.", choices=("max", "all"), flag="--location"),
    ),
    cli=CliBinding("deconv", help=_DECONV_HELP, batch_size=8, writer="convscope.cli.explain:DeconvWriter"),
    units="convscope.methods.registry:deconv_units",
))
register_method(MethodSpec(
    name="occlusion",
    title="Occlusion sensitivity",
    summary="A grey square slid over the photo: how the class probability and the top class change.",
    function="convscope.methods.occlusion:occlusion",
    renderer="convscope.render.views:occlusion_views",
    cost="slow",
    takes_target=True,
    layer="optional",
    progress=True,
    params=(
        Param("window", "int", 16, "Side of the occluding square, in input pixels.", minimum=1, flag="--window",
              unit="pixels"),
        Param("stride", "int", 8, "Step between square positions, in input pixels.", minimum=1, flag="--stride",
              unit="pixels"),
        Param("fill", "fill", "grey", "The square: grey, black or white (pixel colours, normalised like the photo), "
              "or a number in the model's normalised input space (0 = the dataset's mean colour).",
              choices=FILL_NAMES, flag="--fill"),
        Param("channel", "int", None, "Feature map of the layer (default: the strongest on the photo).",
              minimum=0, flag="--channel", optional=True),
        Param("cover_border", "bool", False, "Add clipped squares at the far borders (captum's grid).",
              flag="--cover-border"),
        Param("mode", "str", "exact", "exact (incremental where possible), approximate (the same in bfloat16 "
              "where the hardware is fast at it: faster, probabilities off by up to ~0.03) or full (every copy "
              "through the whole network).", choices=("exact", "approximate", "full"), flag="--mode"),
        Param("batch_size", "int", 64, "Occluded copies per forward pass.", minimum=1, maximum=1024,
              flag="--batch-size"),
    ),
    cli=CliBinding("occlusion", help=_OCCLUSION_HELP, writer="convscope.cli.occlusion_cmd:OcclusionWriter",
                   aliases={"--batch-size": "-b"}),
    units="convscope.methods.registry:occlusion_units",
))
register_method(MethodSpec(
    name="scorecam",
    title="Score-CAM",
    summary="Each channel of a conv layer weighted by the class score of the photo masked with it (no gradients).",
    function="convscope.methods.scorecam:scorecam",
    renderer="convscope.render.views:cam_views",
    cost="slow",
    takes_target=True,
    layer="optional",
    cli=CliBinding("gradcam", {"--variant": "scorecam"}, writer=_GRADCAM_WRITER),
))
