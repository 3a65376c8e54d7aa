"""A GPU worker pod being stopped, on real processes: SIGTERM mid-job drains, nothing is lost.

What Kubernetes does to a worker pod that KEDA scales down or a node drain evicts: SIGTERM, then
SIGKILL once `terminationGracePeriodSeconds` has passed (deploy/helm/fluxserve sets it to the longest
job plus a margin). A real `fluxserve worker` on the fake engine (each job sleeps a known time) and a
real store: SIGTERM lands in the middle of a job. The worker stops claiming and says so on /ready (503)
while it finishes the job; the job is COMPLETED by that worker on its first attempt; the process exits
within the grace period; the job queued behind it was never touched and the next worker runs it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from fluxserve.config import StoreSettings
from fluxserve.contract import GenerateRequest, JobState
from fluxserve.jobs import Job, JobStore, new_job_id
from fluxserve.stores import open_jobs

from conftest import SLUG
from support.app import wait_for
from support.processes import FluxserveProcess, worker
from support.promises import MARGIN_S, START_BOUND_S
from support.stores import drop_prefix

pytestmark = pytest.mark.drill

JOB_SECONDS = 4.0  # the fake engine's sleep per job
SIGTERM_AFTER = 1.0  # into the job
DRAIN_MARGIN_SECONDS = 60.0  # the chart's drainMarginSeconds default: what a busy node gets too
GRACE_SECONDS = JOB_SECONDS + DRAIN_MARGIN_SECONDS  # what the pod would get before SIGKILL


@pytest.fixture(params=["redis", "postgres"])
def store_env(request, tmp_path):
    """(env of the worker processes, a handle on their store)."""
    env = {
        "FLUXSERVE_MODEL": f"fake-sleep:{JOB_SECONDS}",
        "FLUXSERVE_DATA_DIR": str(tmp_path / "data"),
        "FLUXSERVE_LEASE_SECONDS": "3",  # a job abandoned by the drain would be handed out again quickly
        "FLUXSERVE_RECLAIM_BACKOFF_SECONDS": "0",
        "FLUXSERVE_LOG_FORMAT": "json",
    }
    if request.param == "redis":
        prefix = f"fluxserve-drain-{uuid.uuid4().hex[:8]}"
        config = StoreSettings(url=request.getfixturevalue("redis_url"), redis_prefix=prefix)
        env |= {"FLUXSERVE_STORE": config.url, "FLUXSERVE_REDIS_PREFIX": prefix}
    else:
        config = StoreSettings(url=request.getfixturevalue("postgres_url"))
        env |= {"FLUXSERVE_STORE": config.url}
    store, _outbox = open_jobs(config, tmp_path / "unused.sqlite3")
    yield env, store
    if request.param == "redis":
        client = store.client  # type: ignore[attr-defined]
        drop_prefix(client, config.redis_prefix)
    store.close()


def submit(store: JobStore, n: int) -> Job:
    params = GenerateRequest(positivePrompt=f"drained, not dropped {n}", width=128, height=128, steps=8, seed=n)
    return store.submit(Job(id=new_job_id(), slug=SLUG, params=params))


def wait_state(store: JobStore, job_id: str, state: JobState, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        if job is not None and job.state is state:
            return job
        assert time.monotonic() < deadline, f"job {job_id} not {state.value} after {timeout}s: {job}"
        time.sleep(0.02)


def completed_by(process: FluxserveProcess) -> list[str]:
    """Job ids the worker's JSON log says it completed."""
    ids = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "fluxserve.worker" and "completed" in record["message"]:
                ids.append(record.get("job_id"))
    return ids


def test_sigterm_mid_job_drains_within_the_grace_period(store_env, tmp_path: Path):
    env, store = store_env
    draining = worker(tmp_path / "worker-1.log", env).start()
    processes = [draining]
    try:
        draining.wait_ready(timeout=START_BOUND_S)
        first, second = submit(store, 1), submit(store, 2)  # one worker, one job at a time: 2 waits
        running = wait_state(store, first.id, JobState.PROCESSING, timeout=MARGIN_S)  # a ready worker claims at once
        assert running.started_at is not None
        time.sleep(max(0.0, running.started_at + SIGTERM_AFTER - time.time()))  # SIGTERM_AFTER into the job
        assert draining.proc is not None
        draining.proc.send_signal(signal.SIGTERM)
        signalled, signalled_wall = time.monotonic(), time.time()

        # While it drains, the server still answers: not ready (nothing new should be routed to it).
        ready_answers = []
        while draining.alive and time.monotonic() - signalled < GRACE_SECONDS:
            try:
                response = httpx.get(f"{draining.url}/ready", timeout=2)
                ready_answers.append((response.status_code, response.json().get("worker")))
            except httpx.HTTPError:  # shutting down: the listener is closed
                pass
            time.sleep(0.2)
        try:
            exit_code = draining.proc.wait(max(0.0, GRACE_SECONDS - (time.monotonic() - signalled)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker was still running {GRACE_SECONDS}s after SIGTERM:\n{draining.log()[-3000:]}")
        drained_in = time.monotonic() - signalled

        done = store.get(first.id)
        waiting = store.get(second.id)
        assert done is not None and waiting is not None
        print(f"\n[{'redis' if 'FLUXSERVE_REDIS_PREFIX' in env else 'postgres'}] SIGTERM {SIGTERM_AFTER:g}s into "
              f"a {JOB_SECONDS:g}s job: exited {exit_code} after {drained_in:.1f}s (grace {GRACE_SECONDS:g}s); "
              f"/ready during the drain: {sorted(set(ready_answers))}; job {done.state.value} on attempt "
              f"{done.attempts}; the queued one {waiting.state.value}")
        # uvicorn re-raises the SIGTERM once it has shut down cleanly, so the exit status names the signal.
        assert exit_code in (0, -signal.SIGTERM), draining.log()[-3000:]
        assert "Application shutdown complete" in draining.log()
        # It waited for the job (it did not just die): the job's sleep ends JOB_SECONDS after its claim at the
        # earliest, whenever the signal landed; and it exited within the grace period.
        assert signalled_wall + drained_in >= running.started_at + JOB_SECONDS - 0.1, (drained_in, SIGTERM_AFTER)
        assert drained_in < GRACE_SECONDS
        assert (503, "draining") in ready_answers and (200, None) not in ready_answers
        assert done.state is JobState.COMPLETED and done.attempts == 1
        assert done.result is not None and done.started_at == running.started_at
        assert first.id in completed_by(draining)
        # The drain claimed nothing more: the next job waits, untouched, for the next worker.
        assert waiting.state is JobState.QUEUED and waiting.attempts == 0

        successor = worker(tmp_path / "worker-2.log", env).start()
        processes.append(successor)
        finished = wait_state(store, second.id, JobState.COMPLETED, timeout=START_BOUND_S + JOB_SECONDS + MARGIN_S)
        # The worker logs its "completed" line just after the store says so: wait for it.
        assert finished.attempts == 1
        wait_for(lambda: second.id in completed_by(successor), timeout=MARGIN_S,
                 what="the successor's completed log line")
    finally:
        for process in processes:
            process.kill()
