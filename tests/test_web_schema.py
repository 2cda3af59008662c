"""Schemathesis against a live ``convscope serve``: the OpenAPI schema tells the truth.

Every check schemathesis has runs over every operation of ``/openapi.json`` (its coverage,
fuzzing and stateful phases): no reply may be a 5xx, every status code, content type, header
and body must be one the schema documents (errors are ``{"error": ...}``), data the schema
calls invalid must be refused, and a method the path does not take must be a 405 with ``Allow``.

One setting is ours: for "valid data is accepted", the statuses a well-formed request may still
get are the documented 400 (an unknown model, layer or class name: the schema cannot list them,
they depend on the model), 413 and 415 (bytes that are not an image, or too big a one: a
``format: binary`` field cannot say "a decodable image").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from web_server import running_server

CONFIG = """\
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "409", "413", "415"]
"""


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    log = tmp_path / "server.log"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG, encoding="utf-8")
    reports = tmp_path / "reports"
    with running_server("--model", "tiny", "--weights", "random", env={"TMPDIR": str(tmpdir)}, log=log) as base:
        assert base.startswith("http://127.0.0.1:")  # only ever the loopback server we started
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", base + "openapi.json",
             "--checks", "all", "--max-examples", "10", "--seed", "21", "--workers", "2",
             "--request-timeout", "60", "--generation-database", "none", "--no-color",
             "--report", "json", "--report-dir", str(reports)],
            capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        )
    output = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, output
    report = json.loads(next(reports.glob("json-*.json")).read_text(encoding="utf-8"))
    assert report["complete"] and report["exit_code"] == 0, output
    assert report["failures"] == [] and report["errors"] == [], output
    assert report["operations"]["tested"] == report["operations"]["total"] >= 13, report["operations"]
    assert report["test_cases"]["generated"] >= 500, report["test_cases"]
    statuses = re.findall(r'HTTP/1\.1" (\d{3})', log.read_text(encoding="utf-8", errors="replace"))
    assert len(statuses) >= report["test_cases"]["generated"]
    assert not [s for s in statuses if s.startswith("5")], output
    assert {"200", "202", "400", "405"} <= set(statuses)  # methods did run, and jobs were started
    print(f"schemathesis: {len(statuses)} requests, {report['test_cases']['generated']} test cases, "
          f"{report['running_time']:.1f} s")
