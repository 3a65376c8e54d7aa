"""Job stores for the conformance suites: one factory per backend, each test in a fresh key space."""

from __future__ import annotations

import uuid

from fluxserve.jobs.policy import LeasePolicy

LEASE = 0.4
JOB_BACKENDS = ["sqlite", "redis", "postgres"]


def job_store_factory(backend: str, request, tmp_path):
    """(make, cleanup): `make(**policy)` opens another handle on the same backend (another 'process')."""
    opened = []
    prefix = f"test-{uuid.uuid4().hex[:12]}"  # Redis: a fresh key space per test
    url = request.getfixturevalue({"redis": "redis_url", "postgres": "postgres_url"}[backend]) \
        if backend != "sqlite" else None

    def make(**overrides):
        policy = LeasePolicy(**({"lease_seconds": LEASE, "max_attempts": 2, "retention_seconds": 30.0,
                                 "reclaim_backoff_seconds": 0.0} | overrides))
        if backend == "sqlite":
            from fluxserve.jobs.sqlite import SqliteJobStore

            store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy)
        elif backend == "redis":
            from fluxserve.jobs.redis import RedisJobStore

            store = RedisJobStore.from_url(url, prefix=prefix, policy=policy)
        else:
            from fluxserve.jobs.postgres import PostgresJobStore

            store = PostgresJobStore.from_url(url, policy=policy)
        opened.append(store)
        return store

    def cleanup():
        if backend == "redis" and opened:
            drop_prefix(opened[0].client, prefix)
        for store in opened:
            store.close()

    return make, cleanup


def drop_prefix(client, prefix: str) -> None:
    """Delete every Redis key under `prefix` (a test's own key space; never a FLUSHDB on a shared server)."""
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(key)
