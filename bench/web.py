"""Web app and report timings, in one run.

1. ``POST /api/classify`` on a real ``convscope serve`` (uvicorn subprocess, loopback) against
   calling ``convscope.classify`` in-process on the same photo: latency (median of sequential
   calls, each including decoding the upload) and throughput (requests per second with 8
   concurrent clients).
2. ``convscope explore`` on the same photo: wall time of each part of the report.

Usage: python bench/web.py [--requests 40] [--image PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import httpx
    import skimage
    import torch

    import convscope
    from convscope.explore import explore
    from convscope.render.report import report_html

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--image", type=Path, default=Path(skimage.data_dir) / "coffee.png")
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min) on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    data = args.image.read_bytes()

    # In-process: what the route does minus HTTP (decode + preprocess + forward + top-5).
    loaded = convscope.load_model()

    def local_call() -> float:
        t0 = time.perf_counter()
        prediction = convscope.classify(loaded, convscope.load_image(args.image))[0]
        assert prediction.labels[0] == "espresso"
        return time.perf_counter() - t0

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "convscope", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/"
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(base + "api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        print(f"server ready in {time.perf_counter() - started:.1f} s (model loaded at start-up)")
        with httpx.Client(timeout=120) as client:

            def call(_: int) -> float:
                t0 = time.perf_counter()
                response = client.post(base + "api/classify", files={"image": ("coffee.png", data)})
                assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "espresso"
                return time.perf_counter() - t0

            local_call(), call(0)
            # Alternate the two, so both see the same machine load.
            pairs = [(local_call(), call(k)) for k in range(args.requests)]
            local = statistics.median(p[0] for p in pairs)
            remote = statistics.median(p[1] for p in pairs)
            print(f"in-process classify: median {local * 1e3:.1f} ms ({1 / local:.1f}/s sequential)")
            print(f"HTTP /api/classify:  median {remote * 1e3:.1f} ms sequential "
                  f"(x{remote / local:.2f} in-process; HTTP + multipart + JSON {1e3 * (remote - local):+.1f} ms)")
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(call, range(args.requests)))
            wall = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.requests):
                local_call()
            local_wall = time.perf_counter() - started
            print(f"throughput: HTTP with 8 concurrent clients {args.requests / wall:.1f} req/s; in-process "
                  f"sequential {args.requests / local_wall:.1f}/s (x{local_wall / wall:.2f})")
    finally:
        server.terminate()
        server.wait(timeout=30)

    batch = loaded.preprocess.to_tensor(convscope.load_image(args.image))
    started = time.perf_counter()
    result = explore(loaded, batch, image=str(args.image))
    explored = time.perf_counter() - started
    started = time.perf_counter()
    html = report_html(result)
    rendered = time.perf_counter() - started
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    print(f"explore: {parts}; html {rendered:.1f} s ({len(html) / 1e6:.1f} MB); total {explored + rendered:.1f} s")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
