"""What an autoscaler counts per model is exactly the model's QUEUED + PROCESSING jobs, on a real store.

KEDA sizes each worker group of the Helm chart (deploy/helm/fluxserve) from the store itself: on Redis
the `redis` scaler reads the ZCARD of `redis.active_key(prefix, slug)` (one trigger per slug), on
PostgreSQL the `postgresql` scaler runs `postgres.active_jobs_query(slugs)` as it is. Both must follow
every way a job enters and leaves the queue: submit, claim, a lease lapsing (requeued, or FAILED once
its attempts are used), complete, fail, cancel (queued or running) and the purge of ended jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from psycopg.rows import tuple_row

from fluxserve.contract import GenerateRequest, JobState
from fluxserve.jobs import Job, JobResult, JobStore, new_job_id
from fluxserve.jobs.postgres import active_jobs_query
from fluxserve.jobs.redis import active_key

from support.stores import LEASE, job_store_factory

A, B = "model-a", "model-b"
RETENTION = 1.0


@pytest.fixture(params=["redis", "postgres"])
def backend(request, tmp_path):
    """(make a store handle, count the active jobs of some slugs the way KEDA does)."""
    make, cleanup = job_store_factory(request.param, request, tmp_path)
    yield make, (count_redis if request.param == "redis" else count_postgres)
    cleanup()


def count_redis(store, slugs: list[str]) -> int:
    """One KEDA `redis` trigger per slug: the ZCARD of the slug's active set (its scaler checks the key's
    TYPE first: a sorted set, or no key at all once it is empty)."""
    total = 0
    for slug in slugs:
        key = active_key(store.prefix, slug)
        assert store.client.type(key) in ("zset", "none"), key
        total += store.client.zcard(key)
    return total


def count_postgres(store, slugs: list[str]) -> int:
    """The KEDA `postgresql` trigger: the query, literally, on a connection of the store's database."""
    with store.pool.connection() as conn:
        row = conn.cursor(row_factory=tuple_row).execute(active_jobs_query(slugs)).fetchone()
    assert row is not None
    return int(row[0])


def submit(store: JobStore, slug: str, n: int) -> Job:
    return store.submit(Job(id=new_job_id(), slug=slug, params=GenerateRequest(positivePrompt="a cat", seed=n)))


def result() -> JobResult:
    return JobResult(output_key="k.png", media_type="image/png", metrics={})


class Ledger:
    """Every job submitted, so the expected count is read back from the store itself."""

    def __init__(self, store: JobStore, count: Callable[[JobStore, list[str]], int]) -> None:
        self.store = store
        self.count = count
        self.ids: list[str] = []

    def submit(self, slug: str) -> Job:
        job = submit(self.store, slug, len(self.ids))
        self.ids.append(job.id)
        return job

    def expected(self, slugs: list[str]) -> int:
        jobs = [self.store.get(job_id) for job_id in self.ids]
        return sum(1 for job in jobs
                   if job is not None and job.slug in slugs and job.state in (JobState.QUEUED, JobState.PROCESSING))

    def check(self, a: int, b: int) -> None:
        """The counts are `a` and `b`, as the store's own records say, per slug and for both together."""
        got = (self.count(self.store, [A]), self.count(self.store, [B]), self.count(self.store, [A, B]))
        assert got == (self.expected([A]), self.expected([B]), self.expected([A, B]))
        assert got == (a, b, a + b)


def test_active_count_follows_every_transition(backend):
    make, count = backend
    store = make(retention_seconds=RETENTION)
    jobs = Ledger(store, count)
    jobs.check(0, 0)
    for slug in (A, A, A, B, B):
        jobs.submit(slug)
    jobs.check(3, 2)

    # A running job still counts: the worker holding it must not be scaled away under it.
    _, lease_a = store.claim("w1", [A])
    jobs.check(3, 2)
    assert store.complete(lease_a, result())
    jobs.check(2, 2)

    _, lease_b = store.claim("w1", [B])
    assert store.fail(lease_b, "boom")
    jobs.check(2, 1)

    queued_a = store.claim("w1", [A])
    assert queued_a is not None
    store.cancel(queued_a[0].id, "cancelled while running")  # a running job cancelled
    jobs.check(1, 1)
    last_a = next(job_id for job_id in jobs.ids if store.get(job_id).state is JobState.QUEUED
                  and store.get(job_id).slug == A)
    store.cancel(last_a, "cancelled while queued")
    jobs.check(0, 1)
    store.cancel(last_a, "again")  # an ended job is left alone
    jobs.check(0, 1)

    # Ended jobs purged after their retention: nothing comes back.
    time.sleep(RETENTION + 0.2)
    assert len(store.purge_expired()) == 4
    jobs.check(0, 1)
    assert store.claim("w1", [B]) is not None
    jobs.check(0, 1)


def test_a_lapsed_lease_counts_once_until_the_job_fails_for_good(backend):
    make, count = backend
    store = make(max_attempts=2)
    jobs = Ledger(store, count)
    job = jobs.submit(B)
    jobs.submit(A)

    claimed = store.claim("w1", [B])
    assert claimed is not None and claimed[0].id == job.id
    time.sleep(LEASE + 0.2)  # the worker died: its lease lapses
    jobs.check(1, 1)  # still waiting for a worker
    again = store.claim("w2", [B])  # back in the queue at its old place, claimed a second time
    assert again is not None and again[0].id == job.id and again[0].attempts == 2
    jobs.check(1, 1)

    time.sleep(LEASE + 0.2)  # its last attempt lapses too: the next claim ends it FAILED
    assert store.claim("w3", [B]) is None
    assert store.get(job.id).state is JobState.FAILED
    jobs.check(1, 0)


def test_query_quotes_slugs_as_literals():
    assert active_jobs_query(["a", "it's"]) == (
        "SELECT count(*) FROM jobs WHERE slug = ANY(ARRAY['a', 'it''s']) AND state IN ('QUEUED', 'PROCESSING')")
    with pytest.raises(ValueError):
        active_jobs_query([])
