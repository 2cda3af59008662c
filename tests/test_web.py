"""The web app's API against a real uvicorn server in a subprocess (see conftest ``web_server``).

Checks the contract routes and JSON shapes, agreement with the library called in-process,
correctness under concurrency (no hook leaks, no cross-talk between hooked methods), the
upload limits, jobs with progress and cancellation, and the private temp area.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import skimage_photo
from PIL import Image

from convscope.methods.registry import get_method, list_methods

COFFEE = skimage_photo("coffee.png")


@pytest.fixture(scope="module")
def base(web_server: tuple[str, Path]) -> str:
    return web_server[0]


@pytest.fixture(scope="module")
def coffee_bytes() -> bytes:
    return COFFEE.read_bytes()


@pytest.fixture(scope="module")
def expected() -> list[dict[str, Any]]:
    """What ``convscope classify --json`` prints for the photo."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "convscope", "classify", str(COFFEE), "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)[0]["predictions"]  # type: ignore[no-any-return]


def post(base: str, route: str, data: dict[str, Any] | None = None, image: bytes | None = None,
         name: str = "coffee.png", timeout: float = 120) -> httpx.Response:
    files = {"image": (name, image, "application/octet-stream")} if image is not None else None
    return httpx.post(base + route, data=data or {}, files=files, timeout=timeout)


def status(base: str) -> dict[str, Any]:
    return httpx.get(base + "api/status", timeout=30).json()  # type: ignore[no-any-return]


def assert_still_good(base: str, coffee: bytes) -> None:
    response = post(base, "api/classify", {"topk": "1"}, coffee)
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == "espresso"


def test_health(base: str) -> None:
    response = httpx.get(base + "api/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_classify_gives_the_items_of_the_cli(base: str, coffee_bytes: bytes, expected: list[dict[str, Any]]) -> None:
    response = post(base, "api/classify", image=coffee_bytes)
    assert response.status_code == 200
    got = response.json()["predictions"]
    assert [(p["index"], p["label"]) for p in got] == [(p["index"], p["label"]) for p in expected]
    assert [set(p) for p in got] == [{"index", "label", "probability"}] * 5
    np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in expected], rtol=1e-5)
    assert got[0]["label"] == "espresso" and got[0]["probability"] > 0.9

    three = post(base, "api/classify", {"topk": "3"}, coffee_bytes).json()["predictions"]
    assert [p["index"] for p in three] == [p["index"] for p in expected[:3]]


@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).cost == "fast" and n != "classify"])
def test_every_fast_method_returns_a_png(base: str, coffee_bytes: bytes, name: str) -> None:
    spec = get_method(name)
    fields: dict[str, str] = {"method": name}
    if spec.layer == "required":
        fields["layer"] = "stage2"
    if name == "deconv":
        fields["top"] = "2"
    response = post(base, "api/explain", fields, coffee_bytes)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and min(picture.size) >= 32
    caption = httpx.URL("?c=" + response.headers["x-convscope-caption"]).params["c"]
    assert caption.endswith(".") and len(caption) > 40
    if spec.takes_target:
        assert "espresso" in caption


def test_explain_class_and_layer_are_used(base: str, coffee_bytes: bytes) -> None:
    response = post(base, "api/explain", {"method": "gradcam", "target": "cup", "layer": "stage6"}, coffee_bytes)
    assert response.status_code == 200
    caption = httpx.URL("?c=" + response.headers["x-convscope-caption"]).params["c"]
    assert "cup (class 968" in caption and "at stage6" in caption
    assert Image.open(io.BytesIO(response.content)).size == (224, 224)


@pytest.mark.parametrize(
    ("fields", "status_code", "message"),
    [
        ({"method": "gradcam", "layer": "conv99"}, 400, r"^layer conv99: no such layer in efficientnet_lite0"),
        ({"method": "gradcam", "target": "5000"}, 400, r"^target 5000: is out of range"),
        ({"method": "gradcam", "target": "not a class"}, 400, r"^target not a class: is not a class"),
        ({"method": "gradcamm"}, 400, r"^method gradcamm: unknown method \(did you mean: gradcam"),
        ({"method": "occlusion", "window": "zero"}, 400, r"^window zero: must be a whole number"),
        ({"method": "occlusion", "mode": "fast"}, 400, r"^mode fast: is not one of exact, approximate, full"),
        ({"method": "gradcam", "colour": "red"}, 400, r"^colour: is not an option of gradcam"),
        ({}, 400, r"^method: missing"),
    ],
)
def test_bad_parameters_are_4xx_naming_them(base: str, coffee_bytes: bytes, fields: dict[str, str],
                                            status_code: int, message: str) -> None:
    import re

    response = post(base, "api/explain", fields, coffee_bytes)
    assert response.status_code == status_code
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    assert re.search(message, body["error"]), body["error"]


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(rows if rows is not None else b"\0" * (1 + 3 * width) * height)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_bad_uploads_are_4xx_and_the_server_carries_on(base: str, coffee_bytes: bytes) -> None:
    cases: list[tuple[str, httpx.Response, int, str]] = []
    cases.append(("text", post(base, "api/classify", image=b"just some text\n" * 10, name="notes.txt"), 415,
                  "image notes.txt: not an image"))
    cases.append(("truncated", post(base, "api/classify", image=coffee_bytes[: len(coffee_bytes) // 3]), 400,
                  "image coffee.png: truncated or corrupt"))
    bomb = _png(30_000, 30_000, rows=b"")  # 900 Mpx declared in a tiny file
    cases.append(("bomb", post(base, "api/classify", image=bomb, name="bomb.png"), 413, "image bomb.png: image is 30000x30000"))
    cases.append(("oversize", post(base, "api/classify", image=b"\0" * 21_000_000, name="big.png"), 413,
                  "over the 20 MB limit"))
    cases.append(("missing", post(base, "api/classify", {"topk": "5"}), 400, "image: missing"))
    cases.append(("as text", httpx.post(base + "api/classify", data={"image": "coffee.png"}, timeout=30), 400,
                  "image"))
    cases.append(("not multipart", httpx.post(base + "api/classify", json={"image": "x"}, timeout=30), 400,
                  "multipart/form-data"))
    cases.append(("unknown method", post(base, "api/explain", {"method": "tickle"}, coffee_bytes), 400,
                  "method tickle: unknown method"))
    cases.append(("bad topk", post(base, "api/classify", {"topk": "0"}, coffee_bytes), 400, "topk 0: must be at least 1"))
    for label, response, code, text in cases:
        assert response.status_code == code, (label, response.status_code, response.text)
        assert text in response.json()["error"], (label, response.json())
        assert_still_good(base, coffee_bytes)
    assert status(base)["temp_files"] == 0


def test_fifty_concurrent_classify_requests(base: str, coffee_bytes: bytes, expected: list[dict[str, Any]]) -> None:
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: post(base, "api/classify", image=coffee_bytes), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    for response in responses:
        top = response.json()["predictions"][0]
        assert top["label"] == "espresso"
        assert top["probability"] == pytest.approx(expected[0]["probability"], rel=1e-5)
    after = status(base)
    assert [m["hooks"] for m in after["models"]] == [0] * len(after["models"])
    assert after["temp_files"] == 0


def test_hooked_methods_do_not_interfere_under_concurrency(base: str, coffee_bytes: bytes) -> None:
    """Grad-CAM of two classes and two layers, interleaved with classify: each answer equals the
    same request made alone (hooks of one request must not capture another's forward pass)."""
    requests = [{"method": "gradcam", "target": "espresso"}, {"method": "gradcam", "target": "cup", "layer": "stage5"},
                {"method": "saliency"}, {"method": "features", "layer": "stage3", "max_channels": "8"}]
    alone = [post(base, "api/explain", r, coffee_bytes).content for r in requests]
    jobs = [requests[k % len(requests)] for k in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        explains = pool.map(lambda r: post(base, "api/explain", r, coffee_bytes), jobs)
        classifies = pool.map(lambda _: post(base, "api/classify", image=coffee_bytes), range(8))
        together = list(explains)
        assert all(r.json()["predictions"][0]["label"] == "espresso" for r in classifies)
    for k, response in enumerate(together):
        assert response.status_code == 200
        assert response.content == alone[k % len(requests)], f"request {jobs[k]} differs under concurrency"
    assert [m["hooks"] for m in status(base)["models"]] == [0]


def _wait(base: str, job_id: str, seconds: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = httpx.get(base + f"api/jobs/{job_id}", timeout=30).json()
        if body["status"] not in ("queued", "running"):
            return body  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError("job did not finish")


def test_occlusion_job_reports_progress_and_pictures(base: str, coffee_bytes: bytes) -> None:
    response = post(base, "api/jobs", {"method": "occlusion", "window": "64", "stride": "32", "layer": "stage6"},
                    coffee_bytes)
    assert response.status_code == 202
    job = response.json()
    assert job["progress"]["total"] == 6 * 6  # (224 - 64) // 32 + 1 positions per axis
    done = _wait(base, job["id"])
    assert done["status"] == "done", done
    assert done["progress"]["done"] == 36
    assert [v["key"] for v in done["views"]] == ["probability", "classes", "drop", "activation"]
    assert done["record"]["label"] == "espresso"
    picture = httpx.get(base + f"api/jobs/{job['id']}/views/classes.png", timeout=30)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert httpx.get(base + f"api/jobs/{job['id']}/views/nope.png", timeout=30).status_code == 400
    assert httpx.get(base + "api/jobs/0000/views/classes.png", timeout=30).status_code == 404


def test_occlusion_job_can_be_cancelled(base: str, coffee_bytes: bytes) -> None:
    job = post(base, "api/jobs", {"method": "occlusion", "window": "8", "stride": "2", "mode": "full",
                                  "batch_size": "16"}, coffee_bytes).json()
    total = job["progress"]["total"]
    assert total == 109 * 109
    deadline = time.monotonic() + 60
    while httpx.get(base + f"api/jobs/{job['id']}", timeout=30).json()["progress"]["done"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.delete(base + f"api/jobs/{job['id']}", timeout=30).status_code == 200
    final = _wait(base, job["id"], 60)
    assert final["status"] == "cancelled"
    assert 0 < final["progress"]["done"] < total
    assert [m["hooks"] for m in status(base)["models"]] == [0]
    assert_still_good(base, coffee_bytes)


def test_bad_job_parameters_fail_before_the_job_starts(base: str, coffee_bytes: bytes) -> None:
    response = post(base, "api/jobs", {"method": "occlusion", "layer": "nowhere"}, coffee_bytes)
    assert response.status_code == 400
    assert response.json()["error"].startswith("layer nowhere: no such layer")


def test_page_docs_and_schema_use_relative_urls(base: str) -> None:
    import re

    page = httpx.get(base, timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert links and all(not link.startswith(("/", "http")) for link in links), links
    for method in list_methods():  # the menu comes from the registry
        if method != "classify":
            assert f'value="{method}"' in page.text
    for link in links:
        if not link.startswith("#"):
            assert httpx.get(base + link, timeout=30).status_code == 200, link
    docs = httpx.get(base + "docs", timeout=30)
    assert docs.status_code == 200
    assert not re.search(r'(?:src|href)="(?:https?:)?//', docs.text)
    schema = httpx.get(base + "openapi.json", timeout=30).json()
    assert {"/api/health", "/api/classify", "/api/explain", "/api/jobs"} <= set(schema["paths"])
    methods = httpx.get(base + "api/methods", timeout=30).json()["methods"]
    assert [m["name"] for m in methods] == list_methods()
    occlusion = next(m for m in methods if m["name"] == "occlusion")
    assert occlusion["cost"] == "slow"
    assert next(p for p in occlusion["params"] if p["name"] == "mode")["choices"] == ["exact", "approximate", "full"]


def test_samples_are_served(base: str) -> None:
    listing = httpx.get(base + "api/samples", timeout=30).json()["samples"]
    assert {s["name"] for s in listing} == {"chelsea.jpg", "coffee.jpg"}
    coffee = httpx.get(base + "api/samples/coffee.jpg", timeout=30)
    assert coffee.status_code == 200 and len(coffee.content) <= 60_000
    top = post(base, "api/classify", image=coffee.content, name="coffee.jpg").json()["predictions"][0]
    assert top["label"] == "espresso"
    assert httpx.get(base + "api/samples/..%2Fweb%2Fapp.py", timeout=30).status_code == 404


def test_server_writes_only_inside_its_temp_area(web_server: tuple[str, Path]) -> None:
    """The server's TMPDIR holds only its own private folder (Starlette's upload spill files are
    kept in memory), and that folder is empty between requests."""
    _, tmpdir = web_server
    # torch makes an empty torchinductor_<user> folder when it starts; it is not ours.
    torch_own = [e for e in tmpdir.iterdir() if e.name.startswith("torchinductor_")]
    assert all(not any(e.iterdir()) for e in torch_own)
    entries = [e for e in tmpdir.iterdir() if e not in torch_own]
    assert [e.name.startswith("convscope-web-") for e in entries] == [True]
    assert oct(entries[0].stat().st_mode & 0o777) == "0o700"
    assert list(entries[0].iterdir()) == []


def test_root_path_only_changes_the_schema_servers() -> None:
    from fastapi.testclient import TestClient

    from convscope.web.app import create_app

    with TestClient(create_app(model="tiny", weights="random"), root_path="/proxy/8000") as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/api/health").json() == {"status": "ok"}
    assert schema["servers"] == [{"url": "/proxy/8000"}]


def test_temp_area_is_removed_on_shutdown() -> None:
    from fastapi.testclient import TestClient

    from convscope.web.app import create_app

    app = create_app(model="tiny", weights="random")
    root = app.state.temp.root
    with TestClient(app) as client:
        assert root.is_dir()
        picture = Image.new("RGB", (40, 40), (200, 30, 30))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        response = client.post("/api/classify", files={"image": ("red.png", buffer.getvalue())})
        assert response.status_code == 200 and len(response.json()["predictions"]) == 5
    assert not root.exists()


def test_binding_beyond_loopback_warns() -> None:
    from convscope.cli.web_cmd import bind_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert bind_warning(host) is None, host
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        message = bind_warning(host)
        assert message is not None and message.startswith(f"binding to {host}: anyone who can reach")


def test_model_lock_shares_readers_and_excludes_writers() -> None:
    import threading

    from convscope.web.state import ModelLock

    lock = ModelLock()
    inside: list[str] = []
    overlap: list[tuple[str, ...]] = []
    guard = threading.Lock()

    def work(kind: str) -> None:
        with lock.hold(kind == "writer"):
            with guard:
                inside.append(kind)
                overlap.append(tuple(inside))
            time.sleep(0.02)
            with guard:
                inside.remove(kind)

    threads = [threading.Thread(target=work, args=("writer" if k % 3 == 0 else "reader",)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(seen == ("writer",) for seen in overlap if "writer" in seen)  # a writer is always alone
    assert max(len(seen) for seen in overlap) > 1  # readers did share


def test_hooked_methods_under_threads_match_sequential_in_process() -> None:
    """The lock the routes take: Grad-CAM at two layers from many threads equals each run alone."""
    import torch

    from convscope.explore import explain
    from convscope.methods.registry import get_method
    from convscope.models.load import load_model
    from convscope.web.state import ModelEntry

    entry = ModelEntry(load_model("tiny", weights="random", seed=0, device="cpu"))
    torch.manual_seed(0)
    batches = [torch.randn(1, 3, 32, 32) for _ in range(4)]
    layers = ["conv1", "conv2"]

    def run(k: int) -> bytes:
        spec = get_method("gradcam")
        with entry.lock.hold(spec.hooks):
            views = explain(entry.loaded, batches[k % 4], spec, layer=layers[k % 2])
        return views.views[1].picture.tobytes()

    alone = [run(k) for k in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(5):
            assert list(pool.map(run, range(8))) == alone


# ---------------------------------------------------------------- issue 21: the web app's findings


@pytest.fixture(scope="module")
def tiny() -> Any:
    """The app in-process with the ``tiny`` model (an unexpected exception is a 500, as when served)."""
    from fastapi.testclient import TestClient

    from convscope.web.app import create_app

    with TestClient(create_app(model="tiny", weights="random"), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _send(client: Any, route: str, fields: dict[str, str], image: bytes) -> Any:
    return client.post(route, data=fields, files={"image": ("red.png", image, "image/png")})


def _one_error(response: Any, status_code: int, pattern: str) -> str:
    import re

    assert response.status_code == status_code, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    assert re.fullmatch(pattern, body["error"]), body["error"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("route", ["/api/explain", "/api/jobs"])
@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("²", r"target ²: is not a class index: use the digits 0-9 only, no sign \(0 is the first class\)"),
        ("--5", r"target --5: is not a class index: use the digits 0-9 only, no sign \(0 is the first class\)"),
        ("-5", r"target -5: is not a class index: use the digits 0-9 only, no sign \(0 is the first class\)"),
        ("١٢", r"target ١٢: is not a class index: use the digits 0-9 only, no sign \(0 is the first class\)"),
        ("9" * 5000, r"target 9{39}…: is out of range: a class index has at most 18 digits"),
    ],
)
def test_finding8_odd_targets_are_400_not_500(tiny: Any, red_png: bytes, route: str, text: str, pattern: str) -> None:
    _one_error(_send(tiny, route, {"method": "gradcam", "target": text}, red_png), 400, pattern)


def test_finding16_a_job_is_validated_like_explain_before_it_is_queued(tiny: Any, red_png: bytes) -> None:
    before = tiny.get("/api/status").json()["jobs"]
    cases = [
        ({"method": "deconv"}, r"layer: is required by deconv: name a layer alias or module path"),
        ({"method": "deconv", "layer": "conv9"}, r"layer conv9: no such layer in tiny.*"),
        ({"method": "filters", "target": "3"}, r"target 3: filters takes no target"),
        ({"method": "occlusion", "target": "zebra"}, r"target zebra: is not a class of tiny \(.*\)"),
        ({"method": "occlusion", "target": "10"}, r"target 10: is out of range: tiny has 10 classes \(0\.\.9\)"),
        ({"method": "occlusion", "stride": "0"}, r"stride 0: must be a whole number of pixels, at least 1"),
    ]
    for fields, pattern in cases:
        explained = _one_error(_send(tiny, "/api/explain", fields, red_png), 400, pattern)
        queued = _one_error(_send(tiny, "/api/jobs", fields, red_png), 400, pattern)
        assert queued == explained
    assert tiny.get("/api/status").json()["jobs"] == before  # nothing was queued


def test_finding16_a_valid_job_still_runs(tiny: Any, red_png: bytes) -> None:
    response = _send(tiny, "/api/jobs", {"method": "deconv", "layer": "conv2", "top": "2"}, red_png)
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 60
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        job = tiny.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done" and job["progress"] == {"done": 2, "total": 2}


@pytest.mark.parametrize(
    ("route", "fields", "pattern"),
    [
        ("/api/classify", {"topk": "0"}, r"topk 0: must be at least 1"),
        ("/api/classify", {"topk": "many"}, r"topk many: must be a whole number"),
        ("/api/explain", {"method": "gradcam", "target": "zebra"}, r"target zebra: is not a class of tiny \(.*\)"),
        ("/api/explain", {"method": "gradcam", "target": "99"},
         r"target 99: is out of range: tiny has 10 classes \(0\.\.9\)"),
        ("/api/explain", {"method": "features", "layer": "conv1", "max_channels": "0"},
         r"max_channels 0: must be at least 1"),
        ("/api/explain", {"method": "occlusion", "window": "zero"},
         r"window zero: must be a whole number of pixels, at least 1"),
        ("/api/explain", {"method": "occlusion", "mode": "fast"}, r"mode fast: is not one of exact, approximate, full"),
        ("/api/explain", {"method": "occlusion", "window": "33"}, r"window 33: is larger than the 32x32 input"),
        ("/api/explain", {"method": "deconv", "layer": "conv1", "channel": "99"},
         r"channel 99: is out of range: layer conv1 has \d+ channels \(0\.\.\d+\)"),
    ],
)
def test_finding19_errors_name_the_form_field_not_a_cli_flag(tiny: Any, red_png: bytes, route: str,
                                                             fields: dict[str, str], pattern: str) -> None:
    message = _one_error(_send(tiny, route, fields, red_png), 400, pattern)
    assert "--" not in message


def test_finding18_405_keeps_its_allow_header(tiny: Any) -> None:
    response = tiny.put("/api/health")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json() == {"error": "Method Not Allowed"}
    response = tiny.patch("/api/jobs/abc")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}


def test_finding17_schema_documents_errors_and_required_fields(tiny: Any) -> None:
    schema = tiny.get("/openapi.json").json()
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["type"] == "string"
    ref = {"$ref": "#/components/schemas/Error"}
    expected = {
        ("/api/classify", "post"): {"400", "413", "415", "503"},
        ("/api/explain", "post"): {"400", "413", "415", "503"},
        ("/api/jobs", "post"): {"400", "413", "415", "503"},
        ("/api/jobs/{job_id}", "get"): {"404"},
        ("/api/jobs/{job_id}", "delete"): {"404"},
        ("/api/jobs/{job_id}/views/{key}.png", "get"): {"400", "404", "409"},
        ("/api/model", "get"): {"400", "503"},
        ("/api/samples/{name}", "get"): {"404"},
    }
    for (path, verb), codes in expected.items():
        responses = schema["paths"][path][verb]["responses"]
        assert codes <= set(responses), (path, verb, set(responses))
        for code in codes:
            assert responses[code]["content"]["application/json"]["schema"] == ref, (path, verb, code)
        assert "422" not in responses or responses["422"]["content"]["application/json"]["schema"] == ref
    for path in ("/api/explain", "/api/jobs"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["properties"]["image"]["format"] == "binary"  # at the top: clients send it as a file
        assert body["required"] == ["image", "method"] and body["additionalProperties"] is False
        branches = {b["properties"]["method"]["const"]: b for b in body["oneOf"]}
        assert list(branches) == [n for n in list_methods() if n != "classify"]
        for name, branch in branches.items():
            spec = get_method(name)
            fields = branch["properties"]
            assert ("layer" in branch["required"]) == (spec.layer == "required"), name
            assert (fields.get("layer") is False) == (spec.layer == "none"), name
            assert (fields.get("target") is False) == (not spec.takes_target), name
            for param in spec.params:
                assert fields[param.name] is not False, (name, param.name)
            others = {p.name for n in list_methods() for p in get_method(n).params} - {p.name for p in spec.params}
            assert all(fields[other] is False for other in others - {"topk"}), name
    deconv = next(b for b in schema["paths"]["/api/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]
                  ["schema"]["oneOf"] if b["properties"]["method"]["const"] == "deconv")
    assert deconv["required"] == ["image", "method", "layer"]


def test_finding15_a_scorecam_job_reports_progress_and_cancels_within_a_batch(base: str, coffee_bytes: bytes) -> None:
    job = post(base, "api/jobs", {"method": "scorecam", "target": "espresso"}, coffee_bytes).json()
    assert job["status"] in ("queued", "running"), job
    deadline = time.monotonic() + 60
    seen = job
    while seen["progress"]["done"] == 0:
        assert seen["status"] in ("queued", "running"), f"the job never reported progress: {seen}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
        seen = httpx.get(base + f"api/jobs/{job['id']}", timeout=30).json()
    answer = httpx.delete(base + f"api/jobs/{job['id']}", timeout=30)
    assert answer.status_code == 200
    assert answer.json()["status"] in ("running", "cancelled")  # it waits a little for the job to stop
    final = _wait(base, job["id"], 60)
    assert final["status"] == "cancelled", final
    # It stopped within one batch of masked copies (64), long before its 1280 channels were done.
    assert seen["progress"]["done"] <= final["progress"]["done"] <= seen["progress"]["done"] + 64
    assert final["progress"]["done"] < 1280
    assert [m["hooks"] for m in status(base)["models"]] == [0]
    assert_still_good(base, coffee_bytes)


def _serve(*args: str, timeout: float = 120) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "convscope", "serve", *args], capture_output=True, text=True, check=False,
                          timeout=timeout)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--max-upload-mb", "inf"], r"error: --max-upload-mb inf: must be a finite number"),
        (["--max-upload-mb", "nan"], r"error: --max-upload-mb nan: must be a finite number"),
        (["--max-upload-mb", "1e999"], r"error: --max-upload-mb 1e999: must be a finite number"),
        (["--max-upload-mb", "0"], r"error: --max-upload-mb 0: must be between 0\.001 and 1000"),
        (["--max-upload-mb", "1e9"], r"error: --max-upload-mb 1e9: must be between 0\.001 and 1000"),
        (["--max-upload-mb", "²"], r"error: --max-upload-mb ²: must be a number"),
        (["--port", "65536"], r"error: --port 65536: must be between 0 and 65535"),
        (["--port", "-1"], r"error: --port -1: must be between 0 and 65535"),
        (["--port", "８０８０"], r"error: --port ８０８０: must be a whole number"),
        (["--port", "9" * 5000], r"error: --port 9{39}…: is out of range; it must be between 0 and 65535"),
    ],
)
def test_finding9_serve_numbers_are_checked_in_one_line(args: list[str], pattern: str) -> None:
    import re

    result = _serve(*args, "--model", "tiny", "--weights", "random", timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""
    assert re.fullmatch(pattern + r"\n", result.stderr), result.stderr[-2000:]


def test_finding14_a_port_in_use_is_one_line_before_the_model_loads() -> None:
    import re
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # An unknown model would fail as soon as the server tried to load it: the port is checked first.
        result = _serve("--port", str(port), "--model", "no_such_model", timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""
    assert re.fullmatch(rf"error: 127\.0\.0\.1:{port}: address already in use \(is another server running\? "
                        r"choose another --port\)\n", result.stderr), result.stderr[-2000:]
