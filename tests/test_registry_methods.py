"""The method registry: every row is complete and runs (a registry walk: a new row gets these
tests), its options parse and reject bad values by name, and the CLI agrees with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import typer.main

from convscope.errors import BadArgument, UnknownMethod
from convscope.methods.registry import Param, cli_choices, get_method, list_methods

EXPECTED = ["classify", "activations", "features", "filters", "gradcam", "gradcampp", "guided-gradcam",
            "guided", "saliency", "deconv", "occlusion"]


@pytest.fixture(scope="module")
def tiny() -> Any:
    from convscope.models.load import load_model

    return load_model("tiny", weights="random", seed=0, device="cpu")


@pytest.fixture(scope="module")
def tiny_batch(tiny: Any) -> Any:
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return tiny.preprocess.to_tensor(picture)


@pytest.fixture(scope="module")
def cli() -> Any:
    from convscope.cli.main import app

    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return group


def _options(command: Any) -> dict[str, Any]:
    return {flag: p for p in command.params if p.param_type_name == "option" for flag in p.opts}


def test_registry_has_every_method_in_order() -> None:
    assert list_methods()[: len(EXPECTED)] == EXPECTED
    assert "scorecam" in list_methods()[len(EXPECTED):]  # later additions come after the first eleven


@pytest.mark.parametrize("name", list_methods())
def test_row_is_complete(name: str) -> None:
    spec = get_method(name)
    assert callable(spec.resolve_function()) and callable(spec.resolve_renderer())
    assert spec.cost in ("fast", "slow") and spec.summary.endswith(".") and spec.title
    for param in spec.params:
        assert param.help.endswith(".") or param.help.endswith(")"), param.name
        assert param.parse(param.default) == param.default  # defaults are valid values
        if param.choices is not None and param.type == "str":
            assert param.default in param.choices
    assert spec.parse_options({}) == {p.name: p.default for p in spec.params}


@pytest.mark.parametrize("name", list_methods())
def test_every_method_runs_and_renders(name: str, tiny: Any, tiny_batch: Any,
                                       assert_no_side_effects: Callable[..., Any]) -> None:
    from convscope.explore import explain

    spec = get_method(name)
    layer = "conv2" if spec.layer == "required" else None
    options = {"window": 8, "stride": 8} if name == "occlusion" else {}
    if name == "filters":
        layer = "features.0"
    views = assert_no_side_effects(
        tiny.module, lambda: explain(tiny, tiny_batch, name, layer=layer, options=options)
    )
    assert views.views, name
    for view in views.views:
        assert view.picture.dtype == np.uint8 and view.picture.ndim == 3 and view.picture.shape[2] == 3
        assert min(view.picture.shape[:2]) >= 16
        assert view.caption.endswith(".") and len(view.caption.split()) >= 8, view.caption
        assert view.key.replace("_", "").replace("-", "").isalnum()
    assert isinstance(views.record, dict)


def test_progress_units_match_what_the_methods_report(tiny: Any, tiny_batch: Any) -> None:
    for name, options, layer in (("occlusion", {"window": 8, "stride": 4}, None), ("deconv", {"top": 3}, "conv1")):
        spec = get_method(name)
        seen: list[int] = []
        spec.run(tiny, tiny_batch, layer=layer, options=options, progress=seen.append)
        assert sum(seen) == spec.work_units(options, 32, 32), name
    assert get_method("occlusion").work_units({"window": 8, "stride": 4}, 32, 32) == 7 * 7


def test_unknown_method_suggests_close_names() -> None:
    with pytest.raises(UnknownMethod, match=r"^method gradcan: unknown method \(did you mean: gradcam"):
        get_method("gradcan")


@pytest.mark.parametrize(
    ("param", "raw", "message"),
    [
        (Param("window", "int", 16, "x.", minimum=1, flag="--window"), "0", r"^--window 0: must be at least 1$"),
        (Param("window", "int", 16, "x.", minimum=1, flag="--window"), "2.5", r"^--window 2.5: must be a whole number$"),
        (Param("mode", "str", "exact", "x.", choices=("exact", "full"), flag="--mode"), "fast",
         r"^--mode fast: is not one of exact, full$"),
        (Param("fill", "fill", "grey", "x.", choices=("grey", "black"), flag="--fill"), "pink",
         r"^--fill pink: is not grey, black or a number$"),
        (Param("fill", "fill", "grey", "x.", choices=("grey",), flag="--fill"), "nan",
         r"^--fill nan: must be grey or a finite number$"),
        (Param("flag", "bool", False, "x."), "maybe", r"^flag maybe: must be true or false$"),
        (Param("scale", "float", 1.0, "x.", maximum=2), "3", r"^scale 3: must be at most 2$"),
    ],
)
def test_bad_option_values_name_the_option(param: Param, raw: str, message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        param.parse(raw)


def test_option_values_parse_to_their_types() -> None:
    occlusion = get_method("occlusion")
    typed = occlusion.parse_options({"window": "32", "fill": "Gray", "cover_border": "on", "channel": ""})
    assert typed["window"] == 32 and typed["fill"] == "grey" and typed["cover_border"] is True
    assert typed["channel"] is None and typed["mode"] == "exact"
    assert occlusion.parse_options({"fill": "-1.5"})["fill"] == -1.5
    with pytest.raises(BadArgument, match=r"^colour: is not an option of occlusion"):
        occlusion.parse_options({"colour": "red"}, strict=True)


# ---------------------------------------------------------------- the CLI agrees with the registry


@pytest.mark.parametrize("name", list_methods())
def test_cli_command_has_the_registry_options(name: str, cli: Any) -> None:
    spec = get_method(name)
    assert spec.cli is not None
    command = cli.commands[spec.cli.command]
    options = _options(command)
    for flag in spec.cli.fixed:
        assert flag in options, f"{spec.cli.command} has no {flag}"
    for param in spec.params:
        assert param.flag in options, f"{spec.cli.command} has no {param.flag}"
        option = options[param.flag]
        if param.flag != "--channel":  # the CLI's deconv --channel repeats; the registry takes one
            assert option.default == param.default, (param.flag, option.default, param.default)
        if param.choices:
            help_text = option.help or ""
            for choice in param.choices:
                assert choice in help_text, f"{spec.cli.command} {param.flag} help does not mention {choice}"
    assert ("--class" in options and "--label" in options) == spec.takes_target, name
    layer_flag = "--layers" if spec.layer == "many" else "--layer"
    assert (layer_flag in options) == (spec.layer != "none"), name


def test_cli_choice_lists_equal_the_registry() -> None:
    from convscope.cli.explain import VARIANTS
    from convscope.methods.deconvnet import LOCATIONS
    from convscope.methods.occlusion import FILL_COLOURS, MODES

    assert cli_choices("gradcam", "--variant") == VARIANTS
    assert cli_choices("occlusion", "--mode") == MODES
    assert cli_choices("deconv", "--location") == LOCATIONS
    assert cli_choices("features", "--order") == ("index", "activation")
    assert set(cli_choices("occlusion", "--fill")) <= set(FILL_COLOURS)
    with pytest.raises(KeyError):
        cli_choices("occlusion", "--nothing")


def test_registry_imports_neither_torch_nor_pil() -> None:
    """The table is read by forms and --help; its functions and renderers load on first use."""
    import subprocess
    import sys

    code = ("import sys, convscope.methods.registry as r; r.list_methods(); "
            "print(sorted(m for m in ('torch', 'PIL', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
