"""Method registry: one ``MethodSpec`` row per thing convscope can show about an image.

A row says which library function computes the method, which standard inputs it takes (the
image batch, a layer, a target class, a progress callback), its own options with their types,
defaults and choices, which renderer turns its result into captioned pictures and JSON, and
whether it is fast (one or two passes) or slow (hundreds of passes: run as a cancellable job).

The CLI's option choices, the HTML report's sections and the web app's method menu and form are
read from this table, so a method is added by writing its function and one row here.

A row holds its function and renderer as the callables themselves, or, in the rows below, as
*dotted names* (``"convscope.methods.gradcam:gradcam"``) resolved on first use: this module stays
light, so ``methods/`` is free of PIL and matplotlib (renderers live in ``render/``), and the web
app builds its form, or a command its ``--help``, without importing torch.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convscope.errors import BadArgument, UnknownMethod, close_matches
from convscope.methods.binding import (
    ACTIVATIONS_HELP,
    CLASSIFY_HELP,
    DECONV_HELP,
    FEATURES_HELP,
    FILTERS_HELP,
    GRADCAM_HELP,
    GUIDED_HELP,
    IG_HELP,
    LRP_HELP,
    OCCLUSION_HELP,
    SALIENCY_HELP,
    SMOOTHGRAD_HELP,
    CliBinding,
    cam_layer,
    deconv_units,
    first_stage,
    occlusion_units,
)
from convscope.methods.params import FILL_NAMES, Param

COSTS = ("fast", "slow")
LAYER_USES = ("none", "optional", "required", "many")


@dataclass(frozen=True)
class MethodSpec:
    """Everything convscope knows about one method.

    Attributes:
        name: registry key, as typed in ``/api/explain``'s ``method`` field.
        title: human name for menus and report headings.
        summary: one sentence: what the pictures show.
        function: the library function (or its ``"module:attribute"``). It is called as
            ``function(model, [batch,] [target=...,] [layer=.../layers=...,] **options
            [, progress=...])`` according to the flags below.
        renderer: the method's one presentation (or its ``"module:attribute"``): a function
            ``(result, convscope.render.views.ViewContext) -> Views`` that every surface (CLI,
            ``to_image``, report, web) shows.
        cost: ``"fast"`` (a few passes) or ``"slow"`` (many: a job with progress in the web app).
        params: the method's own options.
        takes_images: the function takes the image batch (filters does not).
        takes_target: the function explains a class (``target=``: index, label or ``None``).
        layer: ``"none"``, ``"optional"`` (a default layer exists), ``"required"``, or
            ``"many"`` (a list of layers, passed as ``layers=``).
        layer_kind: what the layer picker should offer: ``"conv"`` (any 4-D layer).
        progress: the function takes ``progress=`` (called with units done).
        exclusive: the method attaches hooks, rules or swaps modules while it runs, so it needs
            the model to itself (the web app's per-model lock). ``hooks=`` is its old name.
        cli: where the method is on the command line.
        units: ``(options, height, width) -> int``: how many progress units a run reports in all
            (for a progress bar), or ``None``.
        in_report: ``convscope explore`` shows it (a section of its own unless a part of
            ``convscope.explore.PARTS`` runs it).
        aliases: old spellings of ``name`` that are still accepted (``/api/explain``'s ``method``,
            the CLI's selector, ``quality --methods``) but shown nowhere.
    """

    name: str
    title: str
    summary: str
    function: Callable[..., Any] | str
    renderer: Callable[..., Any] | str
    cost: str = "fast"
    params: tuple[Param, ...] = ()
    takes_images: bool = True
    takes_target: bool = False
    layer: str = "none"
    progress: bool = False
    exclusive: bool = True
    cli: CliBinding | None = None
    units: Callable[[Mapping[str, Any], int, int], int] | str | None = None
    in_report: bool = True
    aliases: tuple[str, ...] = ()
    if TYPE_CHECKING:  # the old name of ``exclusive``: read as a property, still accepted as a keyword
        hooks: bool = True

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


def _exclusive(spec: MethodSpec) -> bool:
    """``spec.hooks``: the old name of ``exclusive``."""
    return spec.exclusive


def _accept_hooks(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: MethodSpec, *args: Any, hooks: bool | None = None, **kwargs: Any) -> None:
        if hooks is not None:
            kwargs.setdefault("exclusive", hooks)
        init(self, *args, **kwargs)

    return __init__


MethodSpec.__init__ = _accept_hooks(MethodSpec.__init__)  # type: ignore[method-assign]
MethodSpec.hooks = property(_exclusive)  # type: ignore[assignment]


def _resolve(dotted: Callable[..., Any] | str) -> Callable[..., Any]:
    if not isinstance(dotted, str):
        return dotted
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


def canonical_method_name(name: str) -> str:
    """The registry name for ``name`` or one of its old spellings (``gradcam++`` -> ``gradcampp``);
    an unknown name comes back as given."""
    if name in _REGISTRY:
        return name
    return next((spec.name for spec in _REGISTRY.values() if name in spec.aliases), name)


def get_method(name: str) -> MethodSpec:
    """Look a method up (old spellings too); unknown names raise ``UnknownMethod`` with close matches."""
    try:
        return _REGISTRY[canonical_method_name(name)]
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


TOPK = Param("topk", "int", 5, "Classes per image.", minimum=1, maximum=1000, flag="--topk")


register_method(MethodSpec(
    name="classify",
    title="Top-5 classes",
    summary="The classes the network finds most probable, with softmax probabilities.",
    function="convscope.methods.predict:classify",
    renderer="convscope.render.views:prediction_views",
    params=(TOPK,),
    exclusive=False,
    cli=CliBinding("classify", help=CLASSIFY_HELP, batch_size=32, batch_keyword="batch_size", output=False, raw=False, extras=("precision",), aliases={"--topk": "-k"}),
))
register_method(MethodSpec(
    name="activations",
    title="Activation maps",
    summary="The mean of each conv stage's rectified output, in jet over the photo.",
    function="convscope.methods.activations:activation_maps",
    renderer="convscope.render.views:activation_views",
    layer="many",
    cli=CliBinding("activations", help=ACTIVATIONS_HELP, json=False),
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
    cli=CliBinding("features", help=FEATURES_HELP, json=False, default_layer=first_stage),
))
register_method(MethodSpec(
    name="filters",
    title="Filters",
    summary="The kernels of a convolution as tiles (first layer: RGB).",
    function="convscope.methods.filters:conv_filters",
    renderer="convscope.render.views:filter_views",
    takes_images=False,
    layer="optional",
    exclusive=False,
    cli=CliBinding("filters", help=FILTERS_HELP, json=False),
))
register_method(MethodSpec(
    name="gradcam",
    title="Grad-CAM",
    summary="Where in the photo the evidence for a class is, at a conv layer.",
    function="convscope.methods.gradcam:gradcam",
    renderer="convscope.render.views:cam_views",
    takes_target=True,
    layer="optional",
    cli=CliBinding("gradcam", {"--variant": "gradcam"}, help=GRADCAM_HELP, batch_size=16, probability=True,
                   default_layer=cam_layer),
))
register_method(MethodSpec(
    name="gradcampp",
    aliases=("gradcam++", "gradcam_plus_plus"),
    title="Grad-CAM++",
    summary="Grad-CAM with positive gradients weighted per location: spreads over several instances.",
    function="convscope.methods.gradcam:gradcampp",
    renderer="convscope.render.views:cam_views",
    takes_target=True,
    layer="optional",
    in_report=False,
    cli=CliBinding("gradcam", {"--variant": "gradcampp"}, probability=True, default_layer=cam_layer),
))
register_method(MethodSpec(
    name="guided-gradcam",
    title="Guided Grad-CAM",
    summary="Guided backprop times Grad-CAM: fine detail, only where the class evidence is.",
    function="convscope.methods.gradcam:guided_gradcam",
    renderer="convscope.render.views:guided_gradcam_views",
    takes_target=True,
    layer="optional",
    cli=CliBinding("gradcam", {"--variant": "guided"}, probability=True, default_layer=cam_layer),
))
register_method(MethodSpec(
    name="guided",
    title="Guided backprop",
    summary="The input gradient with only positive signals passed back through each ReLU.",
    function="convscope.methods.guided:guided_backprop",
    renderer="convscope.render.views:guided_views",
    takes_target=True,
    cli=CliBinding("guided", help=GUIDED_HELP, batch_size=16, probability=True),
))
register_method(MethodSpec(
    name="saliency",
    title="Saliency",
    summary="The largest |gradient of the class score| over colours, per pixel.",
    function="convscope.methods.guided:saliency",
    renderer="convscope.render.views:saliency_views",
    takes_target=True,
    cli=CliBinding("saliency", help=SALIENCY_HELP, batch_size=16, probability=True),
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
    cli=CliBinding("deconv", help=DECONV_HELP, batch_size=8, ),
    units=deconv_units,
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
    cli=CliBinding("occlusion", help=OCCLUSION_HELP, aliases={"--batch-size": "-b"}, target_as="class"),
    units=occlusion_units,
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
    progress=True,
    in_report=False,
    cli=CliBinding("gradcam", {"--variant": "scorecam"}, probability=True, default_layer=cam_layer),
))

LRP_COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1")
IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
SMOOTHGRAD_BASES = ("saliency", "guided", "ig")

register_method(MethodSpec(
    name="lrp",
    title="LRP",
    summary="Layer-wise relevance propagation: the class score split into per-pixel relevance, red for the class.",
    function="convscope.methods.lrp:lrp",
    renderer="convscope.render.views:attribution_views",
    takes_target=True,
    params=(
        Param("composite", "str", "epsilon-plus-flat", "The rules per layer, zennit's composites: epsilon-plus-flat, "
              "epsilon-gamma-box or epsilon-alpha2-beta1.",
              choices=LRP_COMPOSITES, flag="--composite"),
        Param("epsilon", "float", 1e-6, "Stabiliser of the epsilon rule (dense layers).", minimum=0.0,
              maximum=1e3, flag="--epsilon"),
        Param("gamma", "float", 0.25, "Weight of positive contributions in the gamma rule (epsilon-gamma-box).",
              minimum=0.0, maximum=1e3, flag="--gamma"),
    ),
    cli=CliBinding("lrp", help=LRP_HELP, batch_size=16, probability=True),
))
register_method(MethodSpec(
    name="ig",
    aliases=("integrated_gradients", "integrated-gradients"),
    title="Integrated Gradients",
    summary="The gradient averaged from a baseline to the photo, times their difference: sums to the score's change.",
    function="convscope.methods.paths:integrated_gradients_row",
    renderer="convscope.render.views:attribution_views",
    takes_target=True,
    params=(
        Param("steps", "int", 50, "Points along the path from the baseline to the photo.", minimum=1, maximum=4096,
              flag="--steps"),
        Param("integration", "str", "gausslegendre", "How the path integral is approximated (captum's names): "
              "gausslegendre, riemann_left, riemann_right, riemann_middle or riemann_trapezoid.",
              choices=IG_METHODS, flag="--method"),
        Param("baseline", "fill", 0.0, "The path's start: black, blur, or a number in the model's normalised "
              "input space (0 = the dataset's mean colour).", choices=("black", "blur"), flag="--baseline"),
    ),
    cli=CliBinding("ig", help=IG_HELP, batch_size=1, probability=True),
))
register_method(MethodSpec(
    name="smoothgrad",
    title="SmoothGrad",
    summary="A gradient map averaged over noisy copies of the photo: less speckle, the same evidence.",
    function="convscope.methods.paths:smoothgrad",
    renderer="convscope.render.views:attribution_views",
    takes_target=True,
    params=(
        Param("base", "str", "saliency", "What is averaged: saliency (the signed input gradient), guided "
              "(guided backprop) or ig (Integrated Gradients).", choices=SMOOTHGRAD_BASES, flag="--base"),
        Param("samples", "int", 25, "Noisy copies of the photo.", minimum=1, maximum=4096, flag="--samples"),
        Param("noise", "float", 0.15, "Noise standard deviation as a fraction of the input's range.",
              minimum=0.0, maximum=10.0, flag="--noise"),
        Param("seed", "int", 0, "Seed of the noise.", minimum=0, maximum=2**63 - 1, flag="--seed"),
    ),
    cli=CliBinding("smoothgrad", help=SMOOTHGRAD_HELP, batch_size=1, probability=True),
))
