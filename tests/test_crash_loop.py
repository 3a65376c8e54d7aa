"""Crash-loop drill: a worker SIGKILLed right after every claim, eight times, restarted each time.

A job whose worker died goes back to the queue only once its lease lapsed and then its reclaim delay
(`FLUXSERVE_RECLAIM_BACKOFF_SECONDS`, doubled per attempt) passed. Meanwhile the crashing worker takes
fresh jobs, so its damage is spread over the queue instead of burning one job's three attempts within
seconds: no job fails while it crashes, and once it stops crashing every job completes.

Real processes on loopback: an API replica (`serve --no-worker`) takes the submits, a `fluxserve worker`
on the fake engine (each job sleeps a known time) runs them; the test watches the shared store to kill
the worker as soon as it has claimed. Both shared stores: the SQLite file, and Redis.

Spreading holds while the kills end before any job's third claim, which depends on how fast a worker
restarts. The drill measures that first and sets the backoff from it, so it proves the same point on an
idle machine and on a loaded one; every wait is bounded by a reclaim time read from the store.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from fluxserve.config import StoreSettings
from fluxserve.contract import JobState
from fluxserve.jobs import Job, JobStore
from fluxserve.stores import open_jobs

from conftest import SLUG
from support.processes import FluxserveProcess, api_replica, worker
from support.promises import MARGIN_S, START_BOUND_S, monotonic_of, reclaimable_at, start_ready, wait_until
from support.stores import drop_prefix

pytestmark = pytest.mark.drill

# More kills than jobs: the first jobs are hit twice (their delay doubles), the rest once.
KILLS = 8
JOBS = 6
LEASE_SECONDS = 1.0
JOB_SECONDS = 1.0  # the fake engine's sleep: long enough that every kill lands mid-job
MIN_BACKOFF_SECONDS = 4.0


def backoff_for(restart_seconds: float) -> float:
    """A reclaim backoff B under which the kills end before any job's third claim.

    A job killed at t is claimable again at t + L + B, and after its second kill at t' + L + 2B: its
    third claim comes at least 2L + 3B after its first. The kills take about KILLS restarts; with the
    measured restart time doubled for a busy machine, B = (2 · KILLS · restart − 2L) / 3.
    """
    return max(MIN_BACKOFF_SECONDS, (2 * KILLS * restart_seconds - 2 * LEASE_SECONDS) / 3)


@pytest.fixture(params=["sqlite", "redis"])
def drill(request, tmp_path):
    """(env of every process, the store settings they share, less the backoff the test measures for)."""
    env = {
        "FLUXSERVE_MODEL": f"fake-sleep:{JOB_SECONDS}",
        "FLUXSERVE_DATA_DIR": str(tmp_path / "data"),
        "FLUXSERVE_LEASE_SECONDS": str(LEASE_SECONDS),
        "FLUXSERVE_LOG_LEVEL": "WARNING",
    }
    config = {"lease_seconds": LEASE_SECONDS}
    if request.param == "redis":
        url, prefix = request.getfixturevalue("redis_url"), f"fluxserve-crash-loop-{uuid.uuid4().hex[:8]}"
        config |= {"url": url, "redis_prefix": prefix}
        env |= {"FLUXSERVE_STORE": url, "FLUXSERVE_REDIS_PREFIX": prefix}
    yield env, config
    if request.param == "redis":
        drop_prefix(redis.Redis.from_url(url), prefix)


def reclaim_times(jobs: list[Job], store: JobStore) -> list[float]:
    """When each PROCESSING job may be claimed again (monotonic). Read while no worker is alive, so
    every PROCESSING job's holder is dead."""
    return [monotonic_of(reclaimable_at(job, store.policy)) for job in jobs if job.state is JobState.PROCESSING]


def claimable_at(jobs: list[Job], store: JobStore) -> float:
    """When the next job may be claimed (monotonic): now if one is queued, else the soonest reclaim."""
    if any(job.state is JobState.QUEUED for job in jobs):
        return time.monotonic()
    return min(reclaim_times(jobs, store), default=time.monotonic())


def wait_for_claim(store: JobStore, ids: list[str], seen: set[tuple[str, int]],
                   crashing: FluxserveProcess) -> tuple[str, int]:
    """The (job, attempt) the crashing worker has just claimed: one PROCESSING not seen before.

    Bound: the worker's start time, or the next job's claimable time plus a margin, whichever is later."""
    started = time.monotonic()
    jobs: list[Job] = []

    def claimed() -> tuple[str, int] | None:
        nonlocal jobs
        jobs = [job for job in map(store.get, ids) if job is not None]
        failed = [job.error for job in jobs if job.state is JobState.FAILED]
        assert not failed, f"a job failed during the crash loop: {failed}"
        assert crashing.alive, f"the worker exited by itself:\n{crashing.log()[-3000:]}"
        fresh = [(job.id, job.attempts) for job in jobs if job.state is JobState.PROCESSING
                 and (job.id, job.attempts) not in seen]
        return fresh[0] if fresh else None

    return wait_until(
        claimed, lambda: max(started + START_BOUND_S, claimable_at(jobs, store) + MARGIN_S),
        lambda: f"no claim {time.monotonic() - started:.0f}s after the worker started, although a job was "
                f"claimable {time.monotonic() - claimable_at(jobs, store):.0f}s ago: "
                f"{[(job.id, job.state.value, job.attempts) for job in jobs]}", poll=0.01)


def test_worker_killed_after_every_claim_loses_no_job(drill, tmp_path: Path):
    env, config = drill
    started = time.monotonic()
    probe = worker(tmp_path / "probe.log", env)
    restart_seconds = start_ready(probe)
    probe.kill()
    backoff = backoff_for(restart_seconds)
    env |= {"FLUXSERVE_RECLAIM_BACKOFF_SECONDS": str(backoff)}
    store, _outbox = open_jobs(StoreSettings(**config, reclaim_backoff_seconds=backoff),
                               tmp_path / "data" / "jobs.sqlite3")
    api = api_replica(tmp_path / "api.log", env)
    processes: list[FluxserveProcess] = [api]
    try:
        start_ready(api)
        with httpx.Client(base_url=api.url, timeout=30) as http:
            ids = []
            for i in range(JOBS):
                response = http.post(f"/v2/{SLUG}", json={"positivePrompt": f"crash loop {i}", "width": 128,
                                                          "height": 128, "steps": 2, "seed": i})
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])

        # Eight crashes, each right after a claim; the worker comes back every time.
        kills: list[tuple[str, int]] = []
        crashing_from = time.monotonic()
        for n in range(KILLS):
            crashing = worker(tmp_path / f"worker-{n}.log", env).start()
            processes.append(crashing)
            kills.append(wait_for_claim(store, ids, set(kills), crashing))
            crashing.kill()
        crashed_for = time.monotonic() - crashing_from

        # The crashes stop: once its reclaim time has come, every job runs to its end on one worker.
        all_claimable = max(reclaim_times([job for job in map(store.get, ids) if job is not None], store),
                            default=time.monotonic())
        last = worker(tmp_path / "worker-last.log", env)
        processes.append(last)
        start_ready(last)
        promised = max(time.monotonic(), all_claimable) + JOBS * JOB_SECONDS + MARGIN_S
        ended: list[Job | None] = []

        def all_completed() -> bool:
            nonlocal ended
            ended = [store.get(job_id) for job_id in ids]
            failed = [(job.id, job.error) for job in ended if job is not None and job.state is JobState.FAILED]
            assert not failed, f"jobs failed after the crash loop: {failed}"
            return all(job is not None and job.state is JobState.COMPLETED for job in ended)

        def unfinished() -> str:
            late = f"{time.monotonic() - all_claimable:.0f}s after every job's reclaim time"
            return "; ".join(f"job {job_id} still {job.state.value} on attempt {job.attempts}, {late}" if job
                             else f"job {job_id} gone" for job_id, job in zip(ids, ended, strict=True)
                             if job is None or job.state is not JobState.COMPLETED)

        wait_until(all_completed, lambda: promised, unfinished, poll=0.1)
        per_job = Counter(job_id for job_id, _ in kills)
        print(f"\n[{'redis' if 'FLUXSERVE_STORE' in env else 'sqlite'}] worker restart {restart_seconds:.1f}s, "
              f"so reclaim backoff {backoff:.1f}s; {KILLS} SIGKILLs right after a claim in {crashed_for:.1f}s, "
              f"spread over jobs as {sorted(per_job.values(), reverse=True)}; all {JOBS} COMPLETED, "
              f"{time.monotonic() - started:.1f}s in all")
        # The damage was spread (no job was hit more than twice), and each job ran once more after its kills.
        assert max(per_job.values()) <= 2, (
            f"a job was claimed a third time within the crash loop: the kills took {crashed_for:.1f}s, "
            f"planned for restarts of {restart_seconds:.1f}s (doubled): {kills}")
        assert all(job.attempts == per_job[job.id] + 1 for job in ended if job)
    finally:
        for process in processes:
            process.kill()
        store.close()
