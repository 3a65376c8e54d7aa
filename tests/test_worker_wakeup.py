"""An idle worker is woken by a submit, not by its poll: with the poll set to a minute, a job submitted to
an idle worker still starts at once (SQLite in-process; Redis through pub/sub, from another handle)."""

from __future__ import annotations

import time
import uuid

import pytest

from fluxserve.contract import GenerateRequest, JobState
from fluxserve.engine.fake import SleepingEngine
from fluxserve.jobs import Job, new_job_id
from fluxserve.jobs.postgres import PostgresJobStore
from fluxserve.jobs.redis import RedisJobStore
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.worker import Worker

from support.stores import drop_prefix

POLL_SECONDS = 60.0  # far longer than the test: only a wake-up can start the job in time


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def stores(request, tmp_path):
    """(the worker's store, the submitter's store): two handles, as a worker and an API replica."""
    if request.param == "sqlite":
        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
        yield store, store
        store.close()
        return
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        worker_side, api_side = (PostgresJobStore.from_url(url) for _ in range(2))
        yield worker_side, api_side
        worker_side.close()
        api_side.close()
        return
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    url = request.getfixturevalue("redis_url")
    worker_side, api_side = (RedisJobStore.from_url(url, prefix=prefix) for _ in range(2))
    yield worker_side, api_side
    drop_prefix(api_side.client, prefix)
    worker_side.close()
    api_side.close()


def test_a_submit_wakes_an_idle_worker(stores, tmp_path):
    worker_store, api_store = stores
    worker = Worker(worker_store, LocalOutputStore(tmp_path / "outputs"), SleepingEngine(0.0), lease_seconds=30,
                    slugs=["m"], idle_poll_seconds=POLL_SECONDS)
    worker.start()
    try:
        time.sleep(0.5)  # the worker found nothing and is waiting
        queue_times = []
        for _ in range(3):
            job = api_store.submit(Job(id=new_job_id(), slug="m", params=GenerateRequest(positivePrompt="a cat")))
            ended = api_store.wait_terminal(job.id, timeout=POLL_SECONDS / 2)
            assert ended is not None and ended.state is JobState.COMPLETED, ended
            queue_times.append(ended.result.metrics["queue_time"])
            time.sleep(0.2)  # idle again before the next one
        assert max(queue_times) < POLL_SECONDS / 2  # started by the wake-up, not by the poll
    finally:
        worker.stop(timeout=0)
