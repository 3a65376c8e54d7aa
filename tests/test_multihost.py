"""The multi-host fleet: API replicas and workers that share nothing but the store URL.

On Redis and on PostgreSQL (a private server this module starts, so the outage drill may stop it),
every process gets its own data dir, as if each ran on its own host: a key made with the CLI works on
both replicas, credits spent through both make one balance, a job submitted to one replica is read,
streamed and cancelled through the other, a worker killed mid-job costs nothing, and a store outage
costs no accepted job. Each drill prints what it measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fluxserve.config import Settings
from fluxserve.stores import open_accounts

from conftest import SLUG, wait_status
from support.app import wait_for
from support.processes import FluxserveProcess, PostgresServer, RedisServer, api_replica, worker

pytestmark = pytest.mark.drill

SMALL = {"width": 128, "height": 128, "steps": 2, "outputFormat": "PNG"}
# Seconds on a CPU, so a drill can act while it runs.
LONG = {"width": 384, "height": 384, "steps": 10, "outputFormat": "PNG"}
CREDITS = 1000
# A replica accepts jobs again this soon after the store answers (the pools re-open at once).
RECOVERY_BOUND_S = 15.0


class Store:
    """The private store server: Redis or PostgreSQL, stoppable and restartable on the same port."""

    def __init__(self, backend: str, root: Path) -> None:
        self.backend = backend
        self.root = root
        if backend == "redis":
            self.server: RedisServer | PostgresServer = RedisServer(root / "redis").start()
        else:
            self.server = PostgresServer().start()
        self.url = self.server.url

    def stop(self) -> None:
        if isinstance(self.server, RedisServer):
            self.server.kill()
        else:
            self.server.stop("immediate")

    def start(self) -> None:
        if isinstance(self.server, RedisServer):
            self.server = RedisServer(self.root / "redis", port=self.server.port).start()
        else:
            self.server.start()

    def destroy(self) -> None:
        if isinstance(self.server, RedisServer):
            self.server.kill()
        else:
            self.server.destroy()


class Hosts:
    """Two API replicas and two workers, each with its own data dir ("host"), one store URL."""

    def __init__(self, root: Path, backend: str, tiny_model: Path) -> None:
        self.root = root
        self.store = Store(backend, root)
        self.env = {
            "FLUXSERVE_STORE": self.store.url,
            "FLUXSERVE_MODEL": str(tiny_model),
            "FLUXSERVE_AUTH": "required",
            "FLUXSERVE_LEASE_SECONDS": "6",
            "FLUXSERVE_RECLAIM_BACKOFF_SECONDS": "0",
            "FLUXSERVE_LOG_FORMAT": "json",
        }
        self.apis = [api_replica(root / f"api{i}.log", self.host_env(f"api{i}")) for i in range(2)]
        self.workers = [worker(root / f"worker{i}.log", self.host_env(f"worker{i}")) for i in range(2)]
        self.key = self.cli("keys", "create", "--name", "drill", "--credits", str(CREDITS), "--rate", "0",
                            "--concurrency", "0").splitlines()[-1]
        for process in self.apis + self.workers:
            process.start()
        for process in self.apis + self.workers:
            process.wait_ready()

    def host_env(self, host: str) -> dict[str, str]:
        data_dir = self.root / f"host-{host}"
        data_dir.mkdir(parents=True, exist_ok=True)
        return {**self.env, "FLUXSERVE_DATA_DIR": str(data_dir)}

    def cli(self, *args: str) -> str:
        """`fluxserve ARGS` on a host of its own (an operator's machine), on the shared store."""
        done = subprocess.run([sys.executable, "-m", "fluxserve", *args], env={**os.environ, **self.host_env("cli")},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def ledger(self) -> tuple[list, int, int]:
        """The account's ledger, balance and reserved amount, read from the store as the CLI does."""
        settings = Settings().with_overrides(store=self.store.url, data_dir=self.root / "host-cli")
        store = open_accounts(settings.accounts, settings.store, settings.sqlite_path)
        try:
            found = store.find_account("drill")
            return store.ledger(found.id), found.balance, found.reserved
        finally:
            store.close()

    def client(self, i: int) -> httpx.Client:
        return httpx.Client(base_url=self.apis[i].url, timeout=60, headers={"x-api-key": self.key})

    def ensure_workers(self) -> None:
        for process in self.workers:
            if not process.alive:
                process.start()
        for process in self.workers:
            process.wait_ready()

    def stop(self) -> None:
        for process in self.apis + self.workers:
            process.terminate(timeout=30)
        self.store.destroy()


@pytest.fixture(scope="module", params=["redis", "postgres"])
def hosts(request, tmp_path_factory, tiny_model):
    try:
        hosts = Hosts(tmp_path_factory.mktemp(f"hosts-{request.param}"), request.param, tiny_model)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield hosts
    hosts.stop()


def submit(client: httpx.Client, prompt: str, **params) -> str:
    response = client.post(f"/v2/{SLUG}", json={"positivePrompt": prompt, **params})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def account(hosts: Hosts) -> dict:
    with hosts.client(0) as client:
        return client.get("/v1/account").json()


def test_one_account_book_and_one_queue_across_hosts(hosts):
    """The key made with the CLI works on both replicas; both spend one balance; a job submitted to
    replica A is read, streamed and its media fetched through replica B; cancel works across too."""
    with hosts.client(0) as a, hosts.client(1) as b:
        ids = [submit(c, f"spend {i}", seed=i, **SMALL) for i, c in enumerate([a, b, a, b, a, b])]
        for job_id in ids:
            assert wait_status(b, job_id, timeout=120)["status"] == "COMPLETED"
        result = a.get(f"/v2/requests/{ids[1]}").json()  # submitted through B, read through A
        image = b.get(httpx.URL(result["output"]).path)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        with a.stream("GET", f"/v2/requests/{ids[1]}/events") as events:
            body = "".join(events.iter_text())
        assert "event: completed" in body

        running = submit(a, "cancel me across hosts", **LONG)
        cancelled = b.post(f"/v2/requests/{running}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert wait_status(a, running)["status"] == "FAILED"

    entries, balance, reserved = hosts.ledger()
    charges = [e for e in entries if e.kind == "charge"]
    print(f"\n[{hosts.store.backend}] 6 jobs via 2 replicas + 1 cancelled: balance {balance}, reserved {reserved}, "
          f"{len(entries)} ledger rows, {len(charges)} charges; /v1/account {account(hosts)}")
    assert len(charges) == 6 and reserved == 0 and balance >= 0
    assert sum(e.amount for e in entries) == balance  # the ledger replays to the balance
    assert all(e.balance_after >= 0 for e in entries)


def test_a_worker_killed_mid_job_costs_nothing(hosts):
    with hosts.client(0) as a, hosts.client(1) as b:
        reference = submit(a, "crash", seed=7, **LONG)
        assert wait_status(b, reference, timeout=180)["status"] == "COMPLETED"
        expected = b.get(httpx.URL(b.get(f"/v2/requests/{reference}").json()["output"]).path).content

        job_id = submit(b, "crash", seed=7, **LONG)
        holder = wait_for_holder(hosts.workers, job_id)
        holder.kill()
        final = wait_status(a, job_id, timeout=180)
        assert final["status"] == "COMPLETED", final
        got = a.get(httpx.URL(a.get(f"/v2/requests/{job_id}").json()["output"]).path).content
    assert got == expected
    print(f"\n[{hosts.store.backend}] worker SIGKILLed mid-job: COMPLETED on the other, {len(got)} bytes identical")
    hosts.ensure_workers()


def test_a_store_outage_costs_no_accepted_job(hosts):
    """The store stopped for 5 s and for 20 s while jobs run: submits meanwhile get 503 + Retry-After,
    /ready is 503, every accepted job ends COMPLETED, every process recovers by itself, and each replica
    accepts jobs again within seconds of the store's return (a connection pool's reconnect back-off
    once kept one refusing for tens of seconds)."""
    for outage in (5, 20):
        with hosts.client(0) as a:
            accepted = [submit(a, f"outage {outage} {i}", seed=i, **LONG) for i in range(3)]
            wait_status(a, accepted[0], states=("PROCESSING",))
        hosts.store.stop()
        seen = probe_during(hosts, outage)
        hosts.store.start()
        recovered = [seconds_until_accepting(hosts, i) for i in range(len(hosts.apis))]
        with hosts.client(1) as b:
            finals = [wait_status(b, job_id, timeout=240)["status"] for job_id in accepted]
        print(f"\n[{hosts.store.backend}] store down {outage}s: {seen}; replicas accepting again after "
              f"{', '.join(f'{s:.1f}' for s in recovered)} s; accepted jobs: {finals}")
        assert finals == ["COMPLETED"] * len(accepted)
        assert max(recovered) < RECOVERY_BOUND_S, recovered
        assert seen["submit"] and all(code == 503 for code in seen["submit"]), seen
        assert seen["retry_after"], seen
        assert seen["ready"] and 503 in seen["ready"], seen
    for process in hosts.apis + hosts.workers:
        assert process.alive, process.log()[-2000:]
        process.wait_ready(60)


def seconds_until_accepting(hosts: Hosts, i: int) -> float:
    """Seconds from now until replica `i` accepts a submit (503s meanwhile; bounded by the wait)."""
    started = time.monotonic()
    with hosts.client(i) as client:
        def accepted() -> bool:
            response = client.post(f"/v2/{SLUG}", json={"positivePrompt": "after the outage", **SMALL})
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                time.sleep(0.2)  # as a client honouring Retry-After would, only sooner
            return response.status_code == 200

        wait_for(accepted, timeout=2 * RECOVERY_BOUND_S, what=f"replica {i} accepting after the outage")
    return time.monotonic() - started


def probe_during(hosts: Hosts, seconds: float) -> dict:
    """What a client sees while the store is down: submit and /ready answers."""
    seen: dict = {"submit": [], "ready": [], "retry_after": []}
    deadline = time.monotonic() + seconds
    with hosts.client(0) as a:
        while time.monotonic() < deadline:
            try:
                response = a.post(f"/v2/{SLUG}", json={"positivePrompt": "during the outage", **SMALL}, timeout=15)
                seen["submit"].append(response.status_code)
                if response.headers.get("retry-after"):
                    seen["retry_after"].append(response.headers["retry-after"])
                assert "error" in response.json()
                seen["ready"].append(a.get("/ready", timeout=15).status_code)
            except httpx.TimeoutException:
                seen["submit"].append("timeout")
            time.sleep(0.5)
    return seen


def wait_for_holder(workers: list[FluxserveProcess], job_id: str, timeout: float = 120) -> FluxserveProcess:
    """The worker whose log says it claimed the job."""
    def holder() -> FluxserveProcess | None:
        return next((process for process in workers
                     if any(job_id in line and "claimed" in line for line in process.log().splitlines())), None)

    return wait_for(holder, timeout=timeout, what=f"a worker claiming {job_id}")
