"""Fault drills on a real fleet: two API replicas (`serve --no-worker`) and two `fluxserve worker`s.

The same drills run on both shared stores: one SQLite file on one host, and a Redis this test
starts (append-only file, fsync always). Every process is a real subprocess on loopback; crashes are
SIGKILL. Each drill prints what it measured.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import SLUG, wait_status
from support.processes import FluxserveProcess, RedisServer, api_replica, free_port, worker

pytestmark = pytest.mark.drill

LEASE_SECONDS = "2"
SMALL = {"width": 128, "height": 128, "steps": 2}
# Long enough (seconds on a CPU) that a drill can act while it runs.
LONG = {"width": 512, "height": 512, "steps": 12, "outputFormat": "PNG"}


class Fleet:
    def __init__(self, root: Path, backend: str, tiny_model: Path) -> None:
        self.backend = backend
        env = {
            "FLUXSERVE_MODEL": str(tiny_model),
            "FLUXSERVE_DATA_DIR": str(root / "data"),  # the SQLite file and its outputs, shared on this host
            "FLUXSERVE_LEASE_SECONDS": LEASE_SECONDS,
            "FLUXSERVE_RECLAIM_BACKOFF_SECONDS": "0",  # a killed worker's job runs again once its lease lapses
            "FLUXSERVE_LOG_FORMAT": "json",
        }
        self.redis = None
        if backend == "redis":
            self.redis = RedisServer(root / "redis").start()
            env |= {"FLUXSERVE_STORE": self.redis.url, "FLUXSERVE_OUTPUT_STORE": self.redis.url}
        self.apis = [api_replica(root / f"api{i}.log", env) for i in range(2)]
        self.workers = [worker(root / f"worker{i}.log", env) for i in range(2)]

    def need(self, apis: int = 2, workers: int = 2) -> Fleet:
        """At least this many of each running and ready: restart what earlier drills killed, no more.

        Drills run in file order and each leaves the fleet as it is, so a later drill restarts only
        what it needs (process starts are the slow part of this module).
        """
        for group, wanted in ((self.apis, apis), (self.workers, workers)):
            for process in [p for p in group if not p.alive][: max(0, wanted - len(self.alive(group)))]:
                process.start()
        for process in self.alive(self.apis + self.workers):
            process.wait_ready()
        return self

    @staticmethod
    def alive(group: list[FluxserveProcess]) -> list[FluxserveProcess]:
        return [p for p in group if p.alive]

    def stop(self) -> None:
        for process in self.apis + self.workers:
            process.terminate(timeout=30)
        if self.redis is not None:
            self.redis.kill()

    def client(self, i: int = 0) -> httpx.Client:
        """A client of the i-th running API replica."""
        return httpx.Client(base_url=self.alive(self.apis)[i].url, timeout=30)

    def holder_of(self, job_id: str, timeout: float = 60) -> FluxserveProcess:
        """The worker that claimed the job (from its JSON log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.workers:
                if job_id in log_events(process, "claimed"):
                    return process
            time.sleep(0.05)
        raise TimeoutError(f"no worker claimed {job_id}")


def log_events(process: FluxserveProcess, word: str) -> list[str]:
    """Job ids of the worker's log records whose message has `word` ("claimed", "completed")."""
    ids = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "fluxserve.worker" and word in record["message"] and "job_id" in record:
                ids.append(record["job_id"])
    return ids


def submit(client: httpx.Client, prompt: str, **params) -> str:
    response = client.post(f"/v2/{SLUG}", json={"positivePrompt": prompt, **params})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def completed_result(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    assert wait_status(client, job_id, timeout=timeout)["status"] == "COMPLETED"
    return client.get(f"/v2/requests/{job_id}").json()


def media(client: httpx.Client, result: dict) -> bytes:
    response = client.get(httpx.URL(result["output"]).path)
    assert response.status_code == 200
    return response.content


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def fleet(request, tmp_path_factory, tiny_model):
    try:
        fleet = Fleet(tmp_path_factory.mktemp(f"fleet-{request.param}"), request.param, tiny_model)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield fleet.need()
    finally:
        fleet.stop()


def test_two_workers_race_and_each_job_completes_once(fleet):
    fleet.need(apis=2, workers=2)
    started = time.monotonic()
    clients = [fleet.client(0), fleet.client(1)]
    ids = [submit(clients[i % 2], f"race {i}", seed=i, **SMALL) for i in range(8)]
    # v1 waits on the job's end from whichever replica took the call, while a worker elsewhere runs it.
    sync = clients[1].post(f"/v1/{SLUG}", json={"positivePrompt": "sync", "outputFormat": "PNG", **SMALL})
    assert sync.status_code == 200 and sync.content.startswith(b"\x89PNG")
    results = [completed_result(clients[1], job_id) for job_id in ids]
    completions = Counter(job_id for w in fleet.workers for job_id in log_events(w, "completed") if job_id in ids)
    per_worker = [len(set(log_events(w, "completed")) & set(ids)) for w in fleet.workers]
    print(f"\n[{fleet.backend}] race: {len(ids)} jobs via 2 replicas, 2 workers ran {per_worker}, "
          f"{time.monotonic() - started:.1f}s")
    assert all(completions[job_id] == 1 for job_id in ids)
    assert all(result["metrics"]["attempts"] == 1 for result in results)


def test_metrics_ready_and_json_logs(fleet):
    fleet.need(apis=1, workers=2)
    client = fleet.client(0)
    job_id = submit(client, "observed", **SMALL)
    completed_result(client, job_id)
    assert client.get("/ready").json() == {"status": "ready", "store": "ok"}
    workers = fleet.alive(fleet.workers)
    assert all(httpx.get(f"{w.url}/ready").json()["engine"] == "ready" for w in workers)

    api = samples(client.get("/metrics"))
    assert {labels["state"] for name, labels, _ in api if name == "fluxserve_jobs"} == {
        "QUEUED", "PROCESSING", "COMPLETED", "FAILED"}
    assert value(api, "fluxserve_jobs", state="COMPLETED") >= 1

    scraped = [samples(httpx.get(f"{w.url}/metrics")) for w in workers]

    def total(name: str, **labels) -> float:
        return sum(value(s, name, **labels) for s in scraped)

    for histogram in ("queue_wait", "inference", "encode"):
        assert total(f"fluxserve_job_{histogram}_seconds_count") >= 1
        assert any(name == f"fluxserve_job_{histogram}_seconds_bucket" for s in scraped for name, _, _ in s)
    assert total("fluxserve_jobs_finished_total", state="COMPLETED") >= 1
    assert total("fluxserve_worker_heartbeats_total") >= 1
    heartbeats = [v for s in scraped for name, _, v in s if name == "fluxserve_worker_last_heartbeat_timestamp_seconds"]
    assert len(heartbeats) == len(workers) and all(time.time() - beat < 60 for beat in heartbeats)

    api_log = fleet.alive(fleet.apis)[0].log()
    records = [json.loads(line) for line in api_log.splitlines() if line.startswith("{")]
    assert any(r.get("job_id") == job_id and r.get("request_id") for r in records)
    print(f"\n[{fleet.backend}] /metrics: {len(api)} API samples, {sum(map(len, scraped))} worker samples; "
          f"queue depth {[(labels['state'], v) for name, labels, v in api if name == 'fluxserve_jobs']}")


def samples(response: httpx.Response) -> list[tuple[str, dict, float]]:
    assert response.status_code == 200
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(response.text)
            for s in family.samples]


def value(scraped: list[tuple[str, dict, float]], name: str, **labels) -> float:
    return sum(v for n, ls, v in scraped if n == name and all(ls.get(k) == x for k, x in labels.items()))


def test_api_replica_killed_while_clients_submit_loses_no_accepted_job(fleet):
    fleet.need(apis=2, workers=1)
    victim, survivor = fleet.alive(fleet.apis)[:2]
    accepted: list[str] = []
    refused = 0
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        nonlocal refused
        with fleet.client(0) as first, fleet.client(1) as second:
            for i in range(6):
                try:
                    job_id = submit((first, second)[i % 2], f"client {n} job {i}", seed=i, **SMALL)
                except (httpx.HTTPError, AssertionError):
                    with lock:
                        refused += 1
                    continue
                with lock:
                    accepted.append(job_id)
                time.sleep(0.05)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(accepted) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.kill()
    for thread in threads:
        thread.join()
    with httpx.Client(base_url=survivor.url, timeout=30) as client:
        results = [completed_result(client, job_id) for job_id in accepted]
    print(f"\n[{fleet.backend}] API replica SIGKILL under 4 clients: {len(accepted)} submits got a request_id, "
          f"{refused} refused by the dead replica, {len(results)}/{len(accepted)} COMPLETED")
    assert refused > 0 and len(results) == len(accepted)


def test_worker_killed_mid_job_is_reclaimed_with_identical_bytes(fleet):
    fleet.need(apis=1, workers=2)
    client = fleet.client(0)
    body = dict(seed=4242, **LONG)
    job_id = submit(client, "reclaimed after a crash", **body)
    holder = fleet.holder_of(job_id)
    assert wait_status(client, job_id, states=("PROCESSING",))["status"] == "PROCESSING"
    holder.kill()
    killed_at = time.monotonic()
    result = completed_result(client, job_id)
    reclaimed_in = time.monotonic() - killed_at
    assert result["metrics"]["attempts"] == 2  # the kill really interrupted it
    (survivor,) = fleet.alive(fleet.workers)
    assert job_id in log_events(survivor, "completed")

    undisturbed = completed_result(client, submit(client, "reclaimed after a crash", **body))
    assert undisturbed["metrics"]["attempts"] == 1
    crashed_bytes, clean_bytes = media(client, result), media(client, undisturbed)
    print(f"\n[{fleet.backend}] worker SIGKILL mid-job: completed {reclaimed_in:.1f}s after the kill "
          f"(lease {LEASE_SECONDS}s), attempts 2, {len(crashed_bytes)} bytes identical to an undisturbed run: "
          f"{crashed_bytes == clean_bytes}")
    assert crashed_bytes == clean_bytes


def test_sigterm_drains_the_worker(fleet):
    fleet.need(apis=1, workers=1)
    client = fleet.client(0)
    job_id = submit(client, "drained, not dropped", seed=9, **LONG)
    holder = fleet.holder_of(job_id)
    stopped_at = time.monotonic()
    exit_code = holder.terminate(timeout=120)
    drained_in = time.monotonic() - stopped_at
    result = completed_result(client, job_id)
    print(f"\n[{fleet.backend}] worker SIGTERM mid-job: exited {exit_code} after {drained_in:.1f}s, "
          f"job COMPLETED by it on attempt {result['metrics']['attempts']}")
    # uvicorn re-raises the SIGTERM once it has shut down cleanly, so the exit status names the signal.
    assert exit_code in (0, -signal.SIGTERM) and "Application shutdown complete" in holder.log()
    assert result["metrics"]["attempts"] == 1 and job_id in log_events(holder, "completed")


def test_redis_restart_keeps_queued_jobs(fleet):
    if fleet.backend != "redis":
        pytest.skip("a Redis restart applies to the Redis store only")
    fleet.need(apis=1, workers=0)
    for process in fleet.alive(fleet.workers):
        process.terminate()  # nobody takes the jobs while Redis restarts
    client = fleet.client(0)
    ids = [submit(client, f"survives a restart {i}", seed=i, **SMALL) for i in range(3)]
    fleet.redis.kill()  # SIGKILL: no final save; only the append-only file remains
    fleet.redis.start()
    deadline = time.monotonic() + 60
    while True:  # the replica reconnects on its own
        response = client.get(f"/v2/requests/{ids[0]}/status")
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    positions = [client.get(f"/v2/requests/{job_id}/status").json().get("queue_position") for job_id in ids]
    assert positions == [0, 1, 2]
    fleet.need(apis=1, workers=1)
    results = [completed_result(client, job_id) for job_id in ids]
    print(f"\n[redis] Redis SIGKILL + restart with 3 queued jobs: positions after restart {positions}, "
          f"{len(results)}/3 COMPLETED once a worker came back")


def test_ready_reports_what_is_missing(tmp_path):
    """Not ready: an API whose store does not answer; a worker whose model did not load."""
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    api = api_replica(tmp_path / "api.log", {"FLUXSERVE_STORE": unreachable}).start()
    broken = worker(tmp_path / "worker.log", {"FLUXSERVE_MODEL": str(tmp_path / "no-such-model"),
                                              "FLUXSERVE_DATA_DIR": str(tmp_path)}).start()
    try:
        for process, expected in ((api, "store unreachable"), (broken, "engine failed")):
            deadline = time.monotonic() + 120
            while True:
                try:
                    response = httpx.get(f"{process.url}/ready", timeout=10)
                    if expected in response.json().get("error", ""):
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, process.log()[-2000:]
                time.sleep(0.2)
            assert response.status_code == 503
    finally:
        api.terminate()
        broken.terminate()
