"""The method commands are generated from the method registry: each row's options are on its
command with the row's defaults, bounds and choices, the command set is the registry's, and a
new row with no writer of its own gets a working command (pictures and JSON) from the default writer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.main
from conftest import skimage_photo
from PIL import Image
from typer.testing import CliRunner

from convscope.cli.main import app
from convscope.cli.methods_cmd import register_method_commands
from convscope.methods.registry import CliBinding, MethodSpec, Param, cli_commands, list_methods, registered

TINY = ["--model", "tiny", "--weights", "random"]


def _group() -> Any:
    return typer.main.get_command(app)


def _options(command: Any) -> dict[str, Any]:
    return {flag: p for p in command.params if p.param_type_name == "option" for flag in p.opts}


def test_generated_commands_are_the_registry_commands() -> None:
    generated = {info.name for info in app.registered_commands if getattr(info.callback, "generated", False)}
    assert generated == set(cli_commands())
    assert generated == {"classify", "activations", "features", "filters", "gradcam", "guided", "saliency",
                         "deconv", "occlusion", "lrp", "ig", "smoothgrad"}
    assert {"models", "layers", "summary", "explain", "serve"} <= set(_group().commands)  # hand-written stay


@pytest.mark.parametrize("name", [n for n in list_methods()])
def test_every_param_flag_is_an_option_with_the_rows_default_bounds_and_choices(name: str) -> None:
    from convscope.methods.registry import get_method

    spec = get_method(name)
    assert spec.cli is not None
    command = _group().commands[spec.cli.command]
    options = _options(command)
    for param in spec.params:
        if param.flag is None:
            continue
        option = options[param.flag]
        if param.multiple:
            assert option.multiple and not option.default, param.flag
        else:
            assert option.default == param.default, (param.flag, option.default, param.default)
        for choice in param.choices or ():
            assert choice in (option.help or ""), (param.flag, choice)
        if param.type in ("int", "float") and param.unit is None and not param.multiple:
            assert (option.min, option.max) == (
                param.minimum, param.maximum), param.flag
    rows = cli_commands()[spec.cli.command]
    for flag, value in spec.cli.fixed.items():
        option = options[flag]
        assert option.default == rows[0].cli.fixed[flag]  # type: ignore[union-attr]
        assert value in (option.help or "")
    assert ("--class" in options) == spec.takes_target
    assert ("--layers" in options) == (spec.layer == "many")
    assert ("--layer" in options) == (spec.layer != "none")
    binding = rows[0].cli
    assert binding is not None
    assert ("--output" in options) == binding.output and ("--json" in options) == binding.json
    assert ("--raw" in options) == binding.raw
    if binding.batch_size is not None:
        assert options["--batch-size"].default == binding.batch_size


def test_help_is_the_rows_help_reflowed() -> None:
    result = CliRunner().invoke(app, ["deconv", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "project a layer's strongest activations back to pixels" in text
    assert "convscope deconv cat.jpg --layer stage4 --channel 7 --channel 12 --location all" in text


# ---------------------------------------------------------------- a new method: one row and its function


def mean_input(model: Any, images: Any, *, scale: float = 1.0) -> Any:
    """The mean of each normalised input image, times ``scale``."""
    return images.mean(dim=(1, 2, 3)) * scale


def shade(value: float) -> int:
    return int(min(255, round(abs(value) * 100)))


def mean_views(result: Any, context: Any) -> Any:
    from convscope.render.views import View, Views

    value = float(result[context.index])
    picture = np.full((20, 30, 3), shade(value), dtype=np.uint8)
    return Views((View("shade", "Mean", picture, "The mean of the input, as a grey level, for the test."),),
                 {"method": "mean-input", "mean": value})


MEAN = MethodSpec(
    name="mean-input",
    title="Mean input",
    summary="The mean of the normalised input.",
    function=f"{__name__}:mean_input",
    renderer=f"{__name__}:mean_views",
    params=(Param("scale", "float", 1.0, "Factor on the mean.", minimum=0.0, maximum=10.0, flag="--scale"),),
    hooks=False,
    cli=CliBinding("mean-input", help="Mean of the input.\n\nExample: convscope mean-input cat.jpg", batch_size=4),
)


@pytest.fixture
def mean_command() -> Iterator[None]:
    with registered(MEAN):
        register_method_commands()
        yield
    register_method_commands()


def test_a_new_row_without_a_writer_gets_a_working_command(mean_command: None, tmp_path: Path) -> None:
    from convscope.models.load import load_model

    photos = [skimage_photo("chelsea.png"), skimage_photo("coffee.png")]
    out = tmp_path / "out"
    runner = CliRunner()
    assert "--scale" in runner.invoke(app, ["mean-input", "--help"]).output
    result = runner.invoke(app, ["mean-input", *map(str, photos), *TINY, "--scale", "2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert records == json.loads((out / "mean-input.json").read_text())
    loaded = load_model("tiny", weights="random")
    for photo, record in zip(photos, records, strict=True):
        batch = loaded.preprocess.to_tensor(loaded.preprocess.load_image(photo))
        expected = 2 * float(batch.mean())
        assert record["image"] == str(photo) and record["method"] == "mean-input"
        assert record["mean"] == pytest.approx(expected, rel=1e-5)
        name = f"{photo.stem}_mean-input_shade.png"
        assert record["files"] == [name]
        picture = np.asarray(Image.open(out / name))
        assert picture.shape == (20, 30, 3) and (picture == shade(expected)).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "mean-input" and manifest["options"]["scale"] == 2.0

    bad = runner.invoke(app, ["mean-input", str(photos[0]), *TINY, "--scale", "11", "-o", str(out)])
    assert bad.exit_code == 2
    assert [line for line in bad.stderr.splitlines() if line] == [
        "error: --scale: Input should be less than or equal to 10 (see 'root mean-input --help')"]


def test_the_temporary_row_and_its_command_are_gone_afterwards(tmp_path: Path) -> None:
    with registered(MEAN):
        assert "mean-input" in register_method_commands()
    assert "mean-input" not in list_methods()
    assert "mean-input" not in register_method_commands()
    assert "mean-input" not in _group().commands
