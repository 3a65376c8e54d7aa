"""Crash-loop drill: a worker SIGKILLed right after every claim, ten times, restarted each time.

A job whose worker died goes back to the queue only once its lease lapsed and then its reclaim delay
(`FLUXSERVE_RECLAIM_BACKOFF_SECONDS`, doubled per attempt) passed. Meanwhile the crashing worker takes
fresh jobs, so its damage is spread over the queue instead of burning one job's three attempts within
seconds: no job fails while it crashes, and once it stops crashing every job completes.

Real processes on loopback: an API replica (`serve --no-worker`) takes the submits, a `fluxserve worker`
on the fake engine (each job sleeps a known time) runs them; the test watches the shared store to kill
the worker as soon as it has claimed. Both shared stores: the SQLite file, and Redis.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from fluxserve.config import StoreSettings
from fluxserve.contract import JobState
from fluxserve.jobs import JobStore
from fluxserve.stores import open_jobs

from conftest import SLUG
from support.processes import FluxserveProcess, api_replica, worker
from support.stores import drop_prefix

KILLS = 10
JOBS = 10
LEASE_SECONDS = 1.0
# A killed job waits lease + 8 s before it runs again (lease + 16 s before a third time): the crashing
# worker (restarted in about a second) takes the fresh jobs meanwhile, and ten kills end long before
# any job could have a third claim.
RECLAIM_BACKOFF_SECONDS = 8.0
JOB_SECONDS = 1.0  # the fake engine's sleep: long enough that every kill lands mid-job
DRILL_SECONDS = 60.0


@pytest.fixture(params=["sqlite", "redis"])
def drill(request, tmp_path):
    """(env of every process, a handle on their store)."""
    env = {
        "FLUXSERVE_MODEL": f"fake-sleep:{JOB_SECONDS}",
        "FLUXSERVE_DATA_DIR": str(tmp_path / "data"),
        "FLUXSERVE_LEASE_SECONDS": str(LEASE_SECONDS),
        "FLUXSERVE_RECLAIM_BACKOFF_SECONDS": str(RECLAIM_BACKOFF_SECONDS),
        "FLUXSERVE_LOG_LEVEL": "WARNING",
    }
    config = StoreSettings()
    if request.param == "redis":
        prefix = f"fluxserve-crash-loop-{uuid.uuid4().hex[:8]}"
        config = StoreSettings(url=request.getfixturevalue("redis_url"), redis_prefix=prefix)
        env |= {"FLUXSERVE_STORE": config.url, "FLUXSERVE_REDIS_PREFIX": prefix}
    store, _outbox = open_jobs(config, tmp_path / "data" / "jobs.sqlite3")
    yield env, store
    if request.param == "redis":
        client = store.client  # type: ignore[attr-defined]
        drop_prefix(client, config.redis_prefix)
    store.close()


def wait_for_claim(store: JobStore, ids: list[str], seen: set[tuple[str, int]], deadline: float) -> tuple[str, int]:
    """The (job, attempt) a worker has just claimed: one PROCESSING not seen before. No job may fail."""
    while True:
        jobs = [store.get(job_id) for job_id in ids]
        failed = [job.error for job in jobs if job is not None and job.state is JobState.FAILED]
        assert not failed, f"a job failed during the crash loop: {failed}"
        for job in jobs:
            if job is not None and job.state is JobState.PROCESSING and (job.id, job.attempts) not in seen:
                return job.id, job.attempts
        assert time.monotonic() < deadline, "no claim in time"
        time.sleep(0.01)


def test_worker_killed_after_every_claim_loses_no_job(drill, tmp_path: Path):
    env, store = drill
    started = time.monotonic()
    deadline = started + DRILL_SECONDS
    api = api_replica(tmp_path / "api.log", env).start()
    processes: list[FluxserveProcess] = [api]
    try:
        api.wait_ready(timeout=DRILL_SECONDS)
        with httpx.Client(base_url=api.url, timeout=30) as http:
            ids = []
            for i in range(JOBS):
                response = http.post(f"/v2/{SLUG}", json={"positivePrompt": f"crash loop {i}", "width": 128,
                                                          "height": 128, "steps": 2, "seed": i})
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])

        # Ten crashes, each right after a claim; the worker comes back every time.
        kills: list[tuple[str, int]] = []
        for n in range(KILLS):
            crashing = worker(tmp_path / f"worker-{n}.log", env).start()
            processes.append(crashing)
            kills.append(wait_for_claim(store, ids, set(kills), deadline))
            crashing.kill()
        crashed_for = time.monotonic() - started

        # The crashes stop: once their backoff has passed, every job runs to its end.
        processes.append(worker(tmp_path / "worker-last.log", env).start())
        ended = [store.wait_terminal(job_id, timeout=max(0.0, deadline - time.monotonic())) for job_id in ids]
        states = Counter(job.state.value if job else "gone" for job in ended)
        per_job = Counter(job_id for job_id, _ in kills)
        print(f"\n[{'redis' if 'FLUXSERVE_STORE' in env else 'sqlite'}] {KILLS} SIGKILLs right after a claim "
              f"in {crashed_for:.1f}s, spread over jobs as {sorted(per_job.values(), reverse=True)}; "
              f"then {dict(states)} after {time.monotonic() - started:.1f}s in all")
        assert states == {"COMPLETED": JOBS}, [(job.state, job.error) for job in ended if job]
        # The damage was spread (no job was hit more than twice), and each job ran once more after its kills.
        assert max(per_job.values()) <= 2
        assert all(job.attempts == per_job[job.id] + 1 for job in ended if job)
    finally:
        for process in processes:
            process.kill()
