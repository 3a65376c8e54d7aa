"""Latency of one request on an idle server: how long a job waits to be claimed, and what the HTTP v1
round trip costs over the engine alone, on the same model and size in the same run.

    .venv/bin/python bench/latency.py                  # tiny model, 256², 4 steps, 10 requests
    .venv/bin/python bench/latency.py --size 512 --requests 20

A real `fluxserve` app serves on a loopback port (uvicorn in a thread, the embedded worker on the same
engine settings); each request is sent only after the previous one ended, so the server is idle when
it arrives, and each is paired with one run of the engine alone (same parameters, then JPEG encode).
Prints a markdown table: claim wait (the job's `queue_time`) median and max, v1 round trip median,
engine + encode median, and their ratio.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from fluxserve.api import create_app
from fluxserve.config import Settings
from fluxserve.encode import encode_image
from fluxserve.engine import GenerationParams, load_engine
from fluxserve.engine.tiny import save_tiny_model

SLUG = "juggernaut-pro-flux"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--model", default=None, help="a model location (default: the tiny model, built here)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(save_tiny_model(Path(scratch) / "tiny"))
        settings = Settings(data_dir=Path(scratch) / "data", model=model, port=free_port(), log_level="WARNING",
                            log_format="text")
        body = {"positivePrompt": "a lighthouse at dusk", "width": args.size, "height": args.size,
                "steps": args.steps, "seed": 7, "outputFormat": "JPG"}
        params = GenerationParams(body["positivePrompt"], args.size, args.size, args.steps, 7, 7.0)

        engine = load_engine(settings)
        engine.generate(params)  # warm

        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{settings.port}"
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    try:
                        if http.get("/health").json().get("engine") == "ready":
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
                http.post(f"/v1/{SLUG}", json=body).raise_for_status()  # warm the server's engine
                round_trips, claim_waits, engine_s = [], [], []
                for _ in range(args.requests):  # alternated, so the machine's drift hits both alike
                    started = time.perf_counter()
                    encode_image(engine.generate(params), "JPG")
                    engine_s.append(time.perf_counter() - started)
                    time.sleep(0.3)  # the worker is idle again
                    started = time.perf_counter()
                    response = http.post(f"/v1/{SLUG}", json=body)
                    round_trips.append(time.perf_counter() - started)
                    response.raise_for_status()
                    metrics = http.get(f"/v2/requests/{response.headers['X-Request-Id']}").json()["metrics"]
                    claim_waits.append(metrics["queue_time"])
        finally:
            server.should_exit = True
            thread.join(30)

    print(f"| size | steps | requests | claim wait p50 ms | claim wait max ms | v1 p50 ms | engine+encode p50 ms "
          f"| v1 / engine |\n|---|---|---|---|---|---|---|---|\n"
          f"| {args.size}² | {args.steps} | {args.requests} | {median_ms(claim_waits):.1f} "
          f"| {max(claim_waits) * 1000:.1f} | {median_ms(round_trips):.1f} | {median_ms(engine_s):.1f} "
          f"| {statistics.median(round_trips) / statistics.median(engine_s):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
