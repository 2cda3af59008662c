"""One presentation per method: the renderer of a registry row is what the CLI, the notebook
(``to_image``), the HTML report and the web app show. Adding a method is its function, its row
and its renderer; a throwaway method proves it on every surface."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import convscope
from convscope.cli.main import app
from convscope.cli.methods_cmd import register_method_commands
from convscope.methods.registry import CliBinding, MethodSpec, Param, registered
from convscope.render.figures import MARGIN, TITLE_SIZE, Line, figure, font, line_height, text_block
from convscope.render.views import View, ViewContext, Views
from convscope.types import Renderable

TINY = ["-m", "tiny", "-w", "random"]


@pytest.fixture(scope="module")
def tiny() -> Any:
    return convscope.load_model("tiny", weights="random", seed=0)


@pytest.fixture(scope="module")
def batch(tiny: Any, photo: Image.Image) -> Any:
    return tiny.preprocess.to_tensor(photo)


def _title_band(picture: np.ndarray) -> np.ndarray:
    """The rows of a figure that hold its (one-line) title."""
    return picture[: MARGIN + line_height(font(TITLE_SIZE, bold=True))]


def _titled(title: str, width: int) -> np.ndarray:
    return _title_band(text_block(title, [], width))


# ---------------------------------------------------------------- Score-CAM is called Score-CAM


def test_scorecam_to_image_is_titled_score_cam(tiny: Any, batch: Any) -> None:
    picture = np.asarray(convscope.scorecam(tiny, batch).to_image())
    assert np.array_equal(_title_band(picture), _titled("Score-CAM", picture.shape[1]))
    assert not np.array_equal(_title_band(picture), _titled("Grad-CAM", picture.shape[1]))


def test_gradcam_scorecam_command_titles_its_figures_score_cam(tmp_path: Path) -> None:
    photo = Path(convscope.__file__).parent / "data" / "chelsea.jpg"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["gradcam", str(photo), *TINY, "--variant", "scorecam", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("chelsea_scorecam.png", "chelsea_scorecam_map.png"):
        picture = np.asarray(Image.open(out / name).convert("RGB"))
        assert np.array_equal(_title_band(picture), _titled("Score-CAM", picture.shape[1])), name


# ---------------------------------------------------------------- a new method: its function, its row, its renderer


@dataclass(frozen=True)
class Brightness(Renderable):
    """Mean brightness of each image: ``means`` ``(N,)`` float32 of the normalised input."""

    method: str
    means: Any


def brightness(model: Any, images: Any, *, gain: float = 1.0) -> Brightness:
    """The throwaway method: the mean of each normalised image, times ``gain``."""
    return Brightness("brightness", images.mean(dim=(1, 2, 3)) * gain)


def _grey(value: float) -> np.ndarray:
    return np.full((24, 32, 3), int(min(255, round(abs(value) * 100))), np.uint8)


def brightness_views(result: Brightness, context: ViewContext) -> Views:
    """The throwaway renderer: a grey patch as the picture, captioned as the figure."""
    value = float(result.means[context.index])
    picture = _grey(value)
    view = View("patch", context.title, picture, "The mean of the input, as a grey level.",
                partial(figure, picture, context.title, [Line(f"mean {value:.4f}")]))
    return Views((view,), {"method": "brightness", "mean": value})


BRIGHTNESS = MethodSpec(
    name="brightness",
    title="Brightness",
    summary="The mean of the normalised input, as a grey patch.",
    function=brightness,
    renderer=brightness_views,
    params=(Param("gain", "float", 1.0, "Factor on the mean.", minimum=0.0, maximum=10.0, flag="--gain"),),
    exclusive=False,
    cli=CliBinding("brightness", help="Mean brightness.\n\nExample: convscope brightness cat.jpg", batch_size=4),
)


@pytest.fixture
def with_brightness() -> Iterator[None]:
    with registered(BRIGHTNESS):
        register_method_commands()
        yield
    register_method_commands()


def test_a_method_is_its_function_row_and_renderer_on_every_surface(
    with_brightness: None, tiny: Any, tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from convscope.explore import explore
    from convscope.render.report import data_uri, report_html
    from convscope.web.app import create_app

    photo = Path(convscope.__file__).parent / "data" / "chelsea.jpg"
    batch = tiny.preprocess.to_tensor(tiny.preprocess.load_image(photo))
    expected = 2.0 * float(batch.mean())
    figure_expected = figure(_grey(expected), "Brightness", [Line(f"mean {expected:.4f}")])

    # the CLI: a generated command writes the renderer's figure (or, with --raw, its picture)
    runner = CliRunner()
    for raw, picture in ((False, figure_expected), (True, _grey(expected))):
        out = tmp_path / f"out{raw}"
        done = runner.invoke(app, ["brightness", str(photo), *TINY, "--gain", "2", "-o", str(out),
                                   *(["--raw"] if raw else [])])
        assert done.exit_code == 0, done.output
        assert done.stdout.splitlines()[0] == f"{photo}: 1 picture -> chelsea_brightness_patch.png"
        assert np.array_equal(np.asarray(Image.open(out / "chelsea_brightness_patch.png")), picture)
        (record,) = json.loads((out / "brightness.json").read_text())
        assert record == {"image": str(photo), "method": "brightness", "mean": pytest.approx(expected, rel=1e-5),
                          "files": ["chelsea_brightness_patch.png"]}

    # the notebook: to_image() is the same figure
    result = brightness(tiny, batch, gain=2.0)
    assert np.array_equal(np.asarray(result.to_image(batch, model=tiny)), figure_expected)

    # the web: the form lists the method and its option; /api/explain answers with the picture
    with TestClient(create_app(model="tiny", weights="random")) as client:
        (schema,) = [m for m in client.get("/api/methods").json()["methods"] if m["name"] == "brightness"]
        assert schema["title"] == "Brightness" and [p["name"] for p in schema["params"]] == ["gain"]
        assert 'value="brightness"' in client.get("/").text
        buffer = BytesIO()
        Image.open(photo).save(buffer, format="PNG")
        answer = client.post("/api/explain", data={"method": "brightness", "gain": "2"},
                             files={"image": ("chelsea.png", buffer.getvalue(), "image/png")})
        assert answer.status_code == 200, answer.text
        shown = np.asarray(Image.open(BytesIO(answer.content)))
        assert shown.shape == (24, 32, 3) and len(np.unique(shown)) == 1

    # the report: a section of its own, with the renderer's picture and caption
    exploration = explore(tiny, batch, image=str(photo))
    (section,) = [s for s in exploration.sections if s.key == "brightness"]
    assert section.title == "Brightness" and [v.key for v in section.views] == ["patch"]
    html = report_html(exploration)
    assert 'id="brightness"' in html and data_uri(section.views[0].picture) in html
    assert "The mean of the input, as a grey level." in html


def test_one_name_per_method_and_the_old_spellings_still_work(tmp_path) -> None:
    """Grad-CAM++ is ``gradcampp`` in the registry, the CLI, JSON and Python (issue 23); the old
    spellings are accepted everywhere they were, and listed nowhere."""
    import json

    import convscope
    from convscope.methods.registry import get_method, list_methods

    assert "gradcampp" in list_methods() and "gradcam++" not in list_methods()
    assert get_method("gradcam++") is get_method("gradcampp") is get_method("gradcam_plus_plus")
    assert "gradcampp" in convscope.__all__ and "gradcam_plus_plus" not in convscope.__all__
    assert convscope.gradcam_plus_plus is convscope.gradcampp
    runner = CliRunner()
    help_text = runner.invoke(app, ["gradcam", "--help"], env={"COLUMNS": "200"}).output
    assert "gradcampp" in help_text and "gradcam++" not in help_text
    photo = Path(convscope.__file__).parent / "data" / "chelsea.jpg"
    for spelling, folder in (("gradcampp", "new"), ("gradcam++", "old")):
        done = runner.invoke(app, ["gradcam", str(photo), "-m", "tiny", "-w", "random", "--variant", spelling,
                                   "-o", str(tmp_path / folder), "--json"])
        assert done.exit_code == 0, done.output
        assert (tmp_path / folder / "chelsea_gradcampp.png").is_file()
    new = json.loads((tmp_path / "new" / "gradcam.json").read_text())
    old = json.loads((tmp_path / "old" / "gradcam.json").read_text())
    assert new == old
