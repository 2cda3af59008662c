"""A real ``convscope serve`` in a subprocess on a free port, shared by the web and browser tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(*args: str, startup_seconds: float = 120.0, env: dict[str, str] | None = None,
                   log: Path | None = None) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT/``) of a server started with ``args``."""
    port = free_port()
    environment = {**os.environ, **(env or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [sys.executable, "-m", "convscope", "serve", "--port", str(port), *args],
        stdout=out, stderr=subprocess.STDOUT, env=environment,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            try:
                if httpx.get(base + "api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in time")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            out.close()  # type: ignore[union-attr]
