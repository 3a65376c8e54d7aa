"""Load through a real fleet: N clients, two API replicas, two workers, for SQLite and Redis side by side.

    .venv/bin/python bench/load.py --clients 8 --seconds 20
    .venv/bin/python bench/load.py --clients 2 --seconds 3 --backends sqlite   # a quick check

Each client, in a loop for `--seconds`: submits a job (v2) to one replica, polls its status on the
other until it ends. Then the bench waits for every accepted job to end and counts the ones that did
not complete ("lost"; the exit status is 1 unless it is 0).

By default the workers run a FAKE engine that sleeps (`--engine fake-sleep:0.05`) and returns a flat
image: the figures measure the queue, the API and the stores, not a model. `--engine tiny` runs the
real diffusers pipeline on the tiny random-weight model (128x128, 2 steps) instead.
Everything runs on 127.0.0.1; Redis is a redis-server this script starts (append-only, fsync always).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The process helpers live with the tests (they are not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.processes import RedisServer, api_replica, worker

SLUG = "juggernaut-pro-flux"
BODY = {"positivePrompt": "load", "width": 128, "height": 128, "steps": 2}


@dataclass
class Tally:
    submit_latency: list[float] = field(default_factory=list)
    status_latency: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(urls: list[str], n: int, until: float, tally: Tally) -> None:
    submit_url, poll_url = urls[n % 2], urls[(n + 1) % 2]
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < until:
            started = time.perf_counter()
            response = http.post(f"{submit_url}/v2/{SLUG}", json={**BODY, "seed": n})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                with tally.lock:
                    tally.refused += 1
                continue
            job_id = response.json()["request_id"]
            with tally.lock:
                tally.submit_latency.append(elapsed)
                tally.accepted.append(job_id)
            while time.monotonic() < until + 60:
                started = time.perf_counter()
                status = http.get(f"{poll_url}/v2/requests/{job_id}/status").json().get("status")
                with tally.lock:
                    tally.status_latency.append(time.perf_counter() - started)
                if status in ("COMPLETED", "FAILED"):
                    break
                time.sleep(0.02)


def count_completed(url: str, ids: list[str], timeout: float) -> int:
    """Wait (bounded) for every accepted job to end; how many COMPLETED."""
    deadline = time.monotonic() + timeout
    pending = set(ids)
    completed = 0
    with httpx.Client(timeout=30) as http:
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                status = http.get(f"{url}/v2/requests/{job_id}/status").json().get("status")
                if status in ("COMPLETED", "FAILED"):
                    pending.discard(job_id)
                    completed += status == "COMPLETED"
            if pending:
                time.sleep(0.5)
    return completed


def run_backend(backend: str, args, root: Path, model: str) -> dict:
    env = {"FLUXSERVE_MODEL": model, "FLUXSERVE_DATA_DIR": str(root / "data"), "FLUXSERVE_LOG_LEVEL": "WARNING",
           "FLUXSERVE_WORKER_CONCURRENCY": str(args.concurrency), "HF_HUB_OFFLINE": "1"}
    redis = None
    if backend == "redis":
        redis = RedisServer(root / "redis").start()
        env |= {"FLUXSERVE_STORE": redis.url, "FLUXSERVE_OUTPUT_STORE": redis.url}
    processes = [api_replica(root / f"api{i}.log", env) for i in range(2)]
    processes += [worker(root / f"worker{i}.log", env) for i in range(2)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready()
        urls = [p.url for p in processes[:2]]
        tally = Tally()
        started = time.monotonic()
        until = started + args.seconds
        threads = [threading.Thread(target=client_loop, args=(urls, n, until, tally)) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        completed = count_completed(urls[0], tally.accepted, timeout=120)
        return {
            "backend": backend,
            "submits": len(tally.accepted),
            "submits/s": len(tally.accepted) / args.seconds,
            "submit p50 ms": percentile(tally.submit_latency, 50),
            "submit p99 ms": percentile(tally.submit_latency, 99),
            "status p50 ms": percentile(tally.status_latency, 50),
            "status p99 ms": percentile(tally.status_latency, 99),
            "refused": tally.refused,
            "completed": completed,
            "lost": len(tally.accepted) - completed,
        }
    finally:
        for process in processes:
            process.terminate(timeout=30)
        if redis is not None:
            redis.kill()


def percentile(values: list[float], p: int) -> float:
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--engine", default="fake-sleep:0.05", help="fake-sleep:SECONDS (default) or tiny")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs each worker runs side by side")
    parser.add_argument("--backends", default="sqlite,redis", help="comma-separated: sqlite, redis")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fluxserve-load-") as tmp:
        root = Path(tmp)
        model = args.engine
        if args.engine == "tiny":
            from fluxserve.engine.tiny import save_tiny_model

            model = str(save_tiny_model(root / "tiny-model"))
        label = "FAKE engine (sleeps, no model)" if args.engine.startswith("fake-sleep:") else "tiny model"
        print(f"{args.clients} clients x {args.seconds:g}s, 2 API replicas, 2 workers (concurrency "
              f"{args.concurrency}), engine: {args.engine} [{label}], job {BODY['width']}x{BODY['height']}, "
              f"{BODY['steps']} steps", flush=True)
        rows = [run_backend(backend, args, root / backend, model) for backend in args.backends.split(",")]
    print_table(rows)
    return 1 if any(row["lost"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
