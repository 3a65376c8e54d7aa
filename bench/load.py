"""Load through a real fleet: two API replicas, two workers, for SQLite, Redis and PostgreSQL side by side.

    .venv/bin/python bench/load.py --clients 8 --seconds 20               # closed loop (the default)
    .venv/bin/python bench/load.py --rate 100 --seconds 20                # open loop: 100 submits/s
    .venv/bin/python bench/load.py --clients 2 --seconds 3 --backends sqlite   # a quick check

Closed loop (default): each of `--clients` clients, in a loop for `--seconds`, submits a job (v2) to one
replica and polls its status on the other until it ends. How fast they submit depends on how fast
jobs end, so this measures throughput, not the latency a client sees under a given load.

Open loop (`--rate R`): submits arrive at R per second on a fixed schedule (Poisson arrivals, the same
seeded schedule for every backend), alternating between the replicas, for `--seconds`, by a lean HTTP/1.1
client (keep-alive; httpx would spend more CPU sending than the API spends answering). Each is sent on
time whatever the earlier ones are doing, and its latency runs from its scheduled time, so a stall in
the API shows up in the percentiles instead of quietly slowing the senders (no coordinated omission).
Nobody polls during the window; the workers may fall behind, and the backlog they leave (QUEUED +
PROCESSING jobs when the window closes) and the time to work it off are reported.

Both modes then wait (at most `--drain-timeout` seconds) for every accepted job to end and count the
ones that did not complete ("lost"; the exit status is 1 unless it is 0). "API CPU ms/submit" is the
user + system CPU time the two API processes spent during the window (from /proc/<pid>/stat) divided
by the accepted submits; in the closed loop it includes the clients' status polls ("polls"), so there
"API CPU ms/request" divides it by submits + polls.

By default the workers run a FAKE engine that sleeps (`--engine fake-sleep:0.05`) and returns a flat
image: the figures measure the queue, the API and the stores, not a model. `--engine tiny` runs the
real diffusers pipeline on the tiny random-weight model (128x128, 2 steps) instead.
Everything runs on 127.0.0.1: Redis is a redis-server this script starts (append-only, fsync always),
PostgreSQL a private server it starts with initdb/pg_ctl (fsync off: it measures the code, not the disk).
With Redis or PostgreSQL the processes share nothing but the store URL (each has its own data dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The process helpers live with the tests (they are not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.processes import PostgresServer, RedisServer, api_replica, worker

SLUG = "juggernaut-pro-flux"
BODY = {"positivePrompt": "load", "width": 128, "height": 128, "steps": 2}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class RawHttp:
    """A minimal HTTP/1.1 client on asyncio streams, keep-alive, for both loops: httpx costs the sender
    about 3 ms of CPU a request, which on a small box takes CPU from the servers it measures. It speaks
    only what the bench needs (JSON bodies, Content-Length answers)."""

    def __init__(self, url: str) -> None:
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body) of one request, on an idle keep-alive connection when there is one."""
        if self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._exchange(reader, writer, method, path, body)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the server closed this idle connection (uvicorn does after 5 s): send on a new one
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, method, path, body)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                        body: bytes) -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        writer.write(head.encode() + body)
        try:
            status_line = await reader.readuntil(b"\r\n")
            headers = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            raise
        length = 0
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answer = await reader.readexactly(length)
        self._idle.append((reader, writer))
        return int(status_line.split()[1]), answer

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


@dataclass
class Tally:
    submit_latency: list[float] = field(default_factory=list)
    status_latency: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    refused: int = 0


async def client_loop(clients: list[RawHttp], n: int, until: float, tally: Tally) -> None:
    """One closed-loop client: submit to one replica, poll the other until the job ends, again."""
    submitter, poller = clients[n % 2], clients[(n + 1) % 2]
    while time.monotonic() < until:
        started = time.perf_counter()
        status, answer = await submitter.request("POST", f"/v2/{SLUG}", json.dumps({**BODY, "seed": n}).encode())
        elapsed = time.perf_counter() - started
        if status != 200:
            tally.refused += 1
            continue
        job_id = json.loads(answer)["request_id"]
        tally.submit_latency.append(elapsed)
        tally.accepted.append(job_id)
        while time.monotonic() < until + 60:
            started = time.perf_counter()
            _, answer = await poller.request("GET", f"/v2/requests/{job_id}/status")
            tally.status_latency.append(time.perf_counter() - started)
            if json.loads(answer).get("status") in ("COMPLETED", "FAILED"):
                break
            await asyncio.sleep(0.02)


async def run_clients(urls: list[str], args: argparse.Namespace) -> Tally:
    tally = Tally()
    clients = [RawHttp(url) for url in urls]
    until = time.monotonic() + args.seconds
    await asyncio.gather(*(client_loop(clients, n, until, tally) for n in range(args.clients)))
    for client in clients:
        client.close()
    return tally


def closed_loop(urls: list[str], args: argparse.Namespace) -> tuple[dict, list[str]]:
    tally = asyncio.run(run_clients(urls, args))
    row = {
        "submits": len(tally.accepted),
        "submits/s": len(tally.accepted) / args.seconds,
        "submit p50 ms": percentile(tally.submit_latency, 50),
        "submit p99 ms": percentile(tally.submit_latency, 99),
        "status p50 ms": percentile(tally.status_latency, 50),
        "status p99 ms": percentile(tally.status_latency, 99),
        "polls": len(tally.status_latency),
        "refused": tally.refused,
    }
    return row, tally.accepted


async def send_on_schedule(urls: list[str], rate: float, seconds: float) -> tuple[dict, list[str]]:
    """Poisson arrivals at `rate` per second for `seconds`; each submit is its own task, so a slow answer
    never holds back the next send."""
    schedule = random.Random(0)  # the same arrivals for every backend
    latency: list[float] = []
    accepted: list[str] = []
    errors = 0
    clients = [RawHttp(url) for url in urls]

    async def submit(n: int, scheduled: float) -> None:
        nonlocal errors
        try:
            status, answer = await clients[n % 2].request("POST", f"/v2/{SLUG}",
                                                          json.dumps({**BODY, "seed": n}).encode())
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            return
        if status != 200:
            errors += 1
            return
        latency.append(time.perf_counter() - scheduled)  # from the scheduled send, not the actual one
        accepted.append(json.loads(answer)["request_id"])

    start = time.perf_counter()
    at = start + schedule.expovariate(rate)
    tasks = []
    while at < start + seconds:
        await asyncio.sleep(at - time.perf_counter())  # a late loop sends at once (and that lateness counts)
        tasks.append(asyncio.create_task(submit(len(tasks), at)))
        at += schedule.expovariate(rate)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for client in clients:
        client.close()
    row = {
        "rate/s": rate,
        "submits": len(accepted),
        "submits/s": len(accepted) / elapsed,  # until the last answer, so an API that lags shows below the rate
        "submit p50 ms": percentile(latency, 50),
        "submit p99 ms": percentile(latency, 99),
        "errors": errors,
    }
    return row, accepted


def open_loop(urls: list[str], args: argparse.Namespace) -> tuple[dict, list[str]]:
    return asyncio.run(send_on_schedule(urls, args.rate, args.seconds))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time these processes have used (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def backlog(url: str) -> int:
    """QUEUED + PROCESSING jobs in the store (from /metrics; the store is this run's own)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    waiting = ('fluxserve_jobs{state="QUEUED"}', 'fluxserve_jobs{state="PROCESSING"}')
    return sum(int(float(line.split()[-1])) for line in text.splitlines() if line.startswith(waiting))


def drain(url: str, timeout: float) -> float:
    """Wait (bounded) until no job is QUEUED or PROCESSING; the seconds it took."""
    started = time.monotonic()
    while backlog(url) and time.monotonic() < started + timeout:
        time.sleep(0.2)
    return time.monotonic() - started


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


@contextmanager
def fleet(backend: str, args: argparse.Namespace, root: Path, model: str) -> Iterator[list]:
    """Two API replicas and two workers on `backend`, ready; yields the replicas."""
    env = {"FLUXSERVE_MODEL": model, "FLUXSERVE_DATA_DIR": str(root / "data"), "FLUXSERVE_LOG_LEVEL": "WARNING",
           "FLUXSERVE_WORKER_CONCURRENCY": str(args.concurrency), "HF_HUB_OFFLINE": "1"}
    server: RedisServer | PostgresServer | None = None
    if backend == "redis":
        server = RedisServer(root / "redis").start()
    elif backend == "postgres":
        server = PostgresServer().start()
    if server is not None:
        env["FLUXSERVE_STORE"] = server.url
    processes = []
    for role, count in (("api", 2), ("worker", 2)):
        for i in range(count):
            # A fleet on a shared store shares nothing else: each process has its own data dir.
            own = env | {"FLUXSERVE_DATA_DIR": str(root / f"{role}{i}")} if server is not None else env
            processes.append((api_replica if role == "api" else worker)(root / f"{role}{i}.log", own))
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready()
        yield processes[:2]
    finally:
        for process in processes:
            process.terminate(timeout=30)
        if isinstance(server, RedisServer):
            server.kill()
        elif server is not None:
            server.destroy()


def run_backend(backend: str, args: argparse.Namespace, root: Path, model: str) -> dict:
    with fleet(backend, args, root, model) as replicas:
        urls = [replica.url for replica in replicas]
        pids = [replica.proc.pid for replica in replicas]
        cpu_before = cpu_seconds(pids)
        row, accepted = (open_loop if args.rate else closed_loop)(urls, args)
        api_cpu = cpu_seconds(pids) - cpu_before
        if args.rate:
            row["backlog"] = backlog(urls[0])
            row["drain s"] = drain(urls[0], args.drain_timeout)
        completed = count_completed(urls[0], accepted, timeout=30 if args.rate else args.drain_timeout)
    return {
        "backend": backend,
        **row,
        "completed": completed,
        "lost": len(accepted) - completed,
        "API CPU ms/submit": api_cpu * 1000 / len(accepted) if accepted else float("nan"),
        # The closed loop's CPU also answers its polls: per HTTP request, submits and polls alike.
        **({"API CPU ms/request": api_cpu * 1000 / (len(accepted) + row["polls"])} if "polls" in row else {}),
    }


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
    parser.add_argument("--clients", type=int, default=8, help="closed loop: clients submitting side by side")
    parser.add_argument("--rate", type=float, help="open loop: submits per second (Poisson arrivals)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--drain-timeout", type=float, default=300,
                        help="at most this long to wait for the accepted jobs to end")
    parser.add_argument("--engine", default="fake-sleep:0.05", help="fake-sleep:SECONDS (default) or tiny")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs each worker runs side by side")
    parser.add_argument("--backends", default="sqlite,redis,postgres",
                        help="comma-separated: sqlite, redis, postgres")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fluxserve-load-") as tmp:
        root = Path(tmp)
        model = args.engine
        if args.engine == "tiny":
            from fluxserve.engine.tiny import save_tiny_model

            model = str(save_tiny_model(root / "tiny-model"))
        label = "FAKE engine (sleeps, no model)" if args.engine.startswith("fake-sleep:") else "tiny model"
        load = f"open loop, {args.rate:g} submits/s" if args.rate else f"closed loop, {args.clients} clients"
        print(f"{load} x {args.seconds:g}s, 2 API replicas, 2 workers (concurrency {args.concurrency}), "
              f"engine: {args.engine} [{label}], job {BODY['width']}x{BODY['height']}, {BODY['steps']} steps",
              flush=True)
        rows = [run_backend(backend, args, root / backend, model) for backend in args.backends.split(",")]
    print_table(rows)
    return 1 if any(row["lost"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
