"""The fleet JobStore and Outbox on PostgreSQL: API replicas and workers on many hosts share one queue.

Every transition is one statement or one short transaction. A claim locks its row with
`FOR UPDATE SKIP LOCKED`, so two claimers never lease the same job and never wait on each other; a
transition carrying a stale lease token matches no row and changes nothing. Times (leases, retention,
retries) come from the database's clock (`clock_timestamp()`, which moves on inside a transaction
where `now()` does not), stored as epoch seconds as the Job record exposes them.

Every transition can be re-run after a lost reply: a claim or a delivery lease retried with its
token returns what the first call leased, and a completion or failure retried with its lease answers
True again (an ended job keeps the token it ended under). So the store re-runs a call itself, with the
same arguments, when it meets a transient fault (a reply lost after the server may have acted, a lost
COMMIT acknowledgement), as the Redis client re-sends a command: each try is cut on the client side
when its reply is late, and the whole call, retries included, fits in a third of the lease
(`pgdb.CallTimeouts`).

Waiting does not poll the table in a tight loop: a submit NOTIFYs its slug and an ended job its id,
in the transaction that made the change, and one listener thread per store, on a connection of its
own, wakes the threads waiting on them. A notification sent while the listener reconnects is lost,
so waiters also re-read the table every `_RECHECK_SECONDS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg import Cursor, sql
from psycopg.errors import UniqueViolation
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from fluxserve.contract import JobState
from fluxserve.jobs import (
    IdempotencyConflict,
    IdempotencyKey,
    Job,
    JobResult,
    Lease,
    job_from_record,
    job_record,
)
from fluxserve.jobs.outbox import Delivery, DeliveryLease, DeliveryState
from fluxserve.jobs.policy import RECLAIM_DELAY_CAP, LeasePolicy, idempotency_scope
from fluxserve.pgdb import CONNECT_TIMEOUT_S, CallTimeouts, StoreCalls, migrate, open_pool, watchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

# Versioned schema steps (step n is version n): append a step, never edit one already released.
_MIGRATIONS = [
    """
    CREATE TABLE jobs (
        seq              bigserial PRIMARY KEY,  -- submission order (FIFO)
        id               text NOT NULL UNIQUE,
        slug             text NOT NULL,
        params           jsonb NOT NULL,
        state            text NOT NULL,
        created_at       float8 NOT NULL,
        started_at       float8,
        finished_at      float8,
        expires_at       float8,
        attempts         int NOT NULL DEFAULT 0,
        lease_token      text,
        lease_expires_at float8,
        result           jsonb,
        error            text,
        owner            text,
        meta             jsonb NOT NULL DEFAULT '{}',
        progress         jsonb,
        idem_key         text,  -- idempotency_scope(), while the job holds its key
        idem_fingerprint text
    );
    CREATE INDEX jobs_queued ON jobs (slug, seq) WHERE state = 'QUEUED';
    CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'PROCESSING';
    CREATE INDEX jobs_lease_token ON jobs (lease_token) WHERE lease_token IS NOT NULL;
    CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
    -- One live holder per key: a submit clears the key of a holder past retention before taking it.
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (idem_key) WHERE idem_key IS NOT NULL;

    CREATE TABLE deliveries (
        seq              bigserial PRIMARY KEY,
        id               text NOT NULL UNIQUE,
        job_id           text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,  -- purged with its job
        url              text NOT NULL,
        trigger          text NOT NULL,
        state            text NOT NULL DEFAULT 'pending',
        attempts         jsonb NOT NULL DEFAULT '[]',
        next_attempt_at  float8 NOT NULL DEFAULT 0,
        lease_token      text,  -- kept after release (lease_expires_at NULL), so a retried record is known
        lease_expires_at float8
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at, seq) WHERE state = 'pending';
    CREATE INDEX deliveries_job ON deliveries (job_id);
    CREATE INDEX deliveries_lease_token ON deliveries (lease_token) WHERE lease_token IS NOT NULL;
    """,
    """
    -- Who follows a job's previews, until when (see JobStore.watch_previews); purged with the job.
    CREATE TABLE preview_watchers (
        job_id text PRIMARY KEY,
        until  timestamptz NOT NULL
    );
    """,
]

# Every statement that needs the time reads it once, from the database's clock.
_NOW = "WITH t AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now)"
# A PROCESSING job whose lease lapsed at least `policy.reclaim_delay(attempts)` ago.
_RECLAIMABLE = """(state = 'PROCESSING'
    AND lease_expires_at + least(%(backoff)s * power(2, greatest(attempts - 1, 0)), %(cap)s) <= t.now)"""
_LIVE = "(expires_at IS NULL OR expires_at > t.now)"

_CLAIM = f"""{_NOW}
UPDATE jobs SET state = 'PROCESSING', attempts = attempts + 1, lease_token = %(token)s,
    lease_expires_at = t.now + %(lease)s, started_at = t.now, progress = NULL
FROM t
WHERE jobs.seq = (SELECT seq FROM jobs q, t WHERE (state = 'QUEUED' OR {_RECLAIMABLE}) {{slug_filter}}
                  ORDER BY seq LIMIT 1 FOR UPDATE OF q SKIP LOCKED)
RETURNING jobs.*"""

# Jobs whose lease lapsed after their last allowed attempt end FAILED instead of retrying.
_FAIL_EXHAUSTED = f"""{_NOW},
ended AS (
    UPDATE jobs SET state = 'FAILED', error = %(exhausted)s, finished_at = t.now,
        expires_at = t.now + %(retention)s, lease_token = NULL, lease_expires_at = NULL
    FROM t
    WHERE jobs.seq IN (SELECT seq FROM jobs q, t WHERE {_RECLAIMABLE} AND attempts >= %(max_attempts)s
                       FOR UPDATE OF q SKIP LOCKED)
    RETURNING jobs.id)
SELECT pg_notify(%(ended)s, id) FROM ended"""

_HAS_WORK = f"""{_NOW}
SELECT EXISTS (SELECT 1 FROM jobs, t WHERE (state = 'QUEUED' OR {_RECLAIMABLE}) {{slug_filter}}) AS work"""

# The lease token stays on the ended row: a retried call finds the job ended under it.
_FINISH = f"""{_NOW},
ended AS (
    UPDATE jobs SET state = %(state)s, result = %(result)s, error = %(error)s, finished_at = t.now,
        expires_at = t.now + %(retention)s, lease_expires_at = NULL
    FROM t
    WHERE id = %(id)s AND lease_token = %(token)s AND state = 'PROCESSING'
    RETURNING jobs.id)
SELECT pg_notify(%(ended)s, id) FROM ended"""

# The lease is revoked (token cleared), so the worker's next report, heartbeat or result is refused.
_CANCEL = f"""{_NOW},
ended AS (
    UPDATE jobs SET state = 'FAILED', error = %(error)s, finished_at = t.now,
        expires_at = t.now + %(retention)s, lease_token = NULL, lease_expires_at = NULL
    FROM t
    WHERE id = %(id)s AND state IN ('QUEUED', 'PROCESSING')
    RETURNING jobs.id)
SELECT pg_notify(%(ended)s, id) FROM ended"""

_CLAIM_DELIVERY = f"""{_NOW}
UPDATE deliveries SET lease_token = %(token)s, lease_expires_at = t.now + %(lease)s
FROM t
WHERE deliveries.seq = (
    SELECT d.seq FROM deliveries d JOIN jobs j ON j.id = d.job_id, t
    WHERE d.state = 'pending' AND d.next_attempt_at <= t.now
      AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= t.now)
      AND ((d.trigger = 'finished' AND j.state IN ('COMPLETED', 'FAILED'))
           OR (d.trigger = 'started' AND j.started_at IS NOT NULL))
    ORDER BY d.next_attempt_at, d.seq LIMIT 1 FOR UPDATE OF d SKIP LOCKED)
RETURNING deliveries.*"""

# Releasing the lease clears its expiry and keeps its token (see the deliveries table).
_RECORD_ATTEMPT = f"""{_NOW}
UPDATE deliveries SET attempts = attempts || jsonb_build_array(%(attempt)s::jsonb), state = %(state)s,
    next_attempt_at = coalesce(t.now + %(delay)s::float8, 0), lease_expires_at = NULL
FROM t
WHERE id = %(id)s AND lease_token = %(token)s AND lease_expires_at IS NOT NULL AND state = 'pending'"""

# The jobs of some models waiting or running: what an autoscaler polls to size those models' workers
# (deploy/helm's KEDA `postgresql` triggers run `active_jobs_query(slugs)` as it is: literal SQL, no
# parameters). Counting running jobs too keeps a worker from being scaled away under the job in hand.
ACTIVE_JOBS_QUERY = ("SELECT count(*) FROM jobs WHERE slug = ANY(ARRAY[{slugs}]) "
                     "AND state IN ('QUEUED', 'PROCESSING')")


def active_jobs_query(slugs: Sequence[str]) -> str:
    """ACTIVE_JOBS_QUERY for these slugs, each quoted as an SQL string literal."""
    if not slugs:
        raise ValueError("active_jobs_query needs at least one slug")
    return ACTIVE_JOBS_QUERY.format(slugs=", ".join("'" + slug.replace("'", "''") + "'" for slug in slugs))


# How often a waiter re-reads the table without a notification: what a lost one costs at most.
_RECHECK_SECONDS = 1.0
_SUBMIT_TRIES = 3  # a submit that lost an idempotency race finds the winner on its next try
_ANY = "*"  # a waiter for any payload of its channel
_MAX_PAYLOAD_BYTES = 7999  # NOTIFY refuses 8000 bytes and more
_MAX_CHANNEL_BYTES = 63  # NAMEDATALEN - 1: pg_notify refuses longer names, LISTEN truncates them


class PostgresJobStore:
    def __init__(self, url: str, *, policy: LeasePolicy | None = None) -> None:
        self.policy = policy or LeasePolicy()
        self.timeouts = CallTimeouts.for_lease(self.policy.lease_seconds)
        self.pool = open_pool(url, name="fluxserve-jobs", lease_seconds=self.policy.lease_seconds)
        self._calls = StoreCalls(self.pool, self.timeouts)
        try:
            migrate(self.pool, "jobs", _MIGRATIONS)
            schema = self._one("SELECT current_schema() AS name")["name"]
        except BaseException:
            self.pool.close()
            raise
        # Stores in other schemas of one database must not wake each other: the channel names the schema.
        self._queued_channel = _channel(schema, "queued")  # a job's slug when it is submitted
        self._ended_channel = _channel(schema, "ended")  # a job's id when it ends
        self._listener = _Listener(url, (self._queued_channel, self._ended_channel))

    @classmethod
    def from_url(cls, url: str, *, policy: LeasePolicy | None = None) -> PostgresJobStore:
        return cls(url, policy=policy)

    def outbox(self) -> PostgresOutbox:
        return PostgresOutbox(self)

    # -- connections -------------------------------------------------------------------------

    def _cursor(self, *, transaction: bool = False) -> AbstractContextManager[Cursor[DictRow]]:
        """A cursor for one try of a call (see `pgdb.StoreCalls.cursor`)."""
        return self._calls.cursor(transaction=transaction)

    def _call(self, run: Callable[[bool], T]) -> T:
        """`run(retried)`, run again after a transient fault while the call's budget lasts (see
        `pgdb.StoreCalls.call`): every transition answers a re-run as it answered the first run."""
        return self._calls.call(run)

    def _one(self, query: str, params: Any = None) -> DictRow:
        row = self._fetch_one(query, params)
        assert row is not None, query
        return row

    def _fetch_one(self, query: str, params: Any = None) -> DictRow | None:
        return self._calls.fetch_one(query, params)

    def _fetch_all(self, query: str, params: Any = None) -> list[DictRow]:
        return self._calls.fetch_all(query, params)

    def _rowcount(self, query: str, params: Any = None) -> int:
        """Run one statement whose re-run changes nothing more (and matches as many rows); its row count."""
        return self._calls.rowcount(query, params)

    def _policy_params(self) -> dict[str, Any]:
        policy = self.policy
        return {"backoff": policy.reclaim_backoff_seconds, "cap": RECLAIM_DELAY_CAP, "lease": policy.lease_seconds,
                "retention": policy.retention_seconds, "max_attempts": policy.max_attempts,
                "exhausted": policy.exhausted_error, "ended": self._ended_channel}

    # -- the protocol --------------------------------------------------------------------------

    def submit(
        self, job: Job, *, deliveries: Sequence[Delivery] = (), idempotency: IdempotencyKey | None = None
    ) -> Job:
        job.state = JobState.QUEUED
        for _ in range(_SUBMIT_TRIES - 1):
            try:
                return self._call(lambda _retried: self._submit(job, deliveries, idempotency))
            except UniqueViolation as exc:
                # A concurrent submit with the same key committed first; the next try returns its job.
                if exc.diag.constraint_name != "jobs_idempotency":
                    raise
        return self._call(lambda _retried: self._submit(job, deliveries, idempotency))

    def _submit(self, job: Job, deliveries: Sequence[Delivery], idempotency: IdempotencyKey | None) -> Job:
        idem_key = idempotency_scope(idempotency) if idempotency else None
        record = job_record(job)
        with self._cursor(transaction=True) as cur:
            if idempotency is not None and idem_key is not None:
                holder = self._idempotency_holder(cur, idem_key, idempotency.fingerprint)
                if holder is not None:
                    return holder
            row = cur.execute(
                f"""{_NOW}
                INSERT INTO jobs (id, slug, params, state, created_at, owner, meta, idem_key, idem_fingerprint)
                SELECT %s, %s, %s, %s, coalesce(%s, t.now), %s, %s, %s, %s FROM t
                ON CONFLICT (id) DO NOTHING
                RETURNING created_at""",
                (job.id, job.slug, Jsonb(record["params"]), record["state"], job.created_at or None, job.owner,
                 Jsonb(record["meta"]), idem_key, idempotency.fingerprint if idempotency else None),
            ).fetchone()
            if row is None:  # only a retried call (its first reply was lost) finds it: ids are uuid4
                row = cur.execute("SELECT created_at FROM jobs WHERE id = %s", (job.id,)).fetchone()
            else:
                cur.executemany(
                    """INSERT INTO deliveries (id, job_id, url, trigger, state, attempts, next_attempt_at)
                       VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                    [(d.id, job.id, d.url, d.trigger, d.state, Jsonb(d.attempts), d.next_attempt_at)
                     for d in deliveries],
                )
                # Delivered at COMMIT, never for a submit that rolls back.
                cur.execute("SELECT pg_notify(%s, %s)", (self._queued_channel, _payload(job.slug)))
        assert row is not None
        job.created_at = row["created_at"]
        return job

    def _idempotency_holder(self, cur: Cursor[DictRow], idem_key: str, fingerprint: str) -> Job | None:
        """The live job holding the key (or IdempotencyConflict); an expired holder gives the key up."""
        row = cur.execute(
            f"""{_NOW} SELECT jobs.*, NOT {_LIVE} AS expired FROM jobs, t
                WHERE idem_key = %s FOR UPDATE OF jobs""",
            (idem_key,),
        ).fetchone()
        if row is None:
            return None
        if row["expired"]:
            cur.execute("UPDATE jobs SET idem_key = NULL WHERE seq = %s", (row["seq"],))
            return None
        if row["idem_fingerprint"] != fingerprint:
            raise IdempotencyConflict(row["id"])
        return job_from_record(row)

    def find_idempotent(self, idempotency: IdempotencyKey) -> Job | None:
        row = self._fetch_one(f"{_NOW} SELECT jobs.* FROM jobs, t WHERE idem_key = %s AND {_LIVE}",
                              (idempotency_scope(idempotency),))
        if row is None:
            return None
        if row["idem_fingerprint"] != idempotency.fingerprint:
            raise IdempotencyConflict(row["id"])
        return job_from_record(row)

    def get(self, job_id: str) -> Job | None:
        row = self._fetch_one(f"{_NOW} SELECT jobs.* FROM jobs, t WHERE id = %s AND {_LIVE}", (job_id,))
        return job_from_record(row) if row else None

    def queue_position(self, job_id: str) -> int | None:
        row = self._fetch_one(
            """SELECT (SELECT count(*) FROM jobs ahead
                       WHERE ahead.state = 'QUEUED' AND ahead.slug = me.slug AND ahead.seq < me.seq) AS n
               FROM jobs me WHERE me.id = %s AND me.state = 'QUEUED'""",
            (job_id,),
        )
        return int(row["n"]) if row else None

    def claim(
        self, worker_id: str, slugs: list[str] | None = None, *, token: str | None = None
    ) -> tuple[Job, Lease] | None:
        given = token is not None
        token = token or self.policy.new_token(worker_id)
        params = self._policy_params() | {"token": token, "slugs": slugs}

        def run(retried: bool) -> DictRow | None:
            with self._cursor(transaction=True) as cur:
                if given or retried:  # an earlier try may have leased a job already, its reply lost
                    row = cur.execute("SELECT * FROM jobs WHERE lease_token = %s AND state = 'PROCESSING'",
                                      (token,)).fetchone()
                    if row is not None:
                        return row
                cur.execute(_FAIL_EXHAUSTED, params)
                return cur.execute(_CLAIM.format(slug_filter=_slug_filter(slugs)), params).fetchone()

        row = self._call(run)
        if row is None:
            return None
        return job_from_record(row), Lease(row["id"], token)

    def wait_for_work(self, slugs: list[str] | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Registered before the table is read, so a submit between the two still wakes us.
        with self._listener.watch(self._queued_channel, *(slugs or [_ANY])) as queued:
            while not self._has_work(slugs):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or queued.wait(min(remaining, _RECHECK_SECONDS)):
                    return

    def _has_work(self, slugs: list[str] | None) -> bool:
        query = _HAS_WORK.format(slug_filter=_slug_filter(slugs))
        row = self._fetch_one(query, self._policy_params() | {"slugs": slugs})
        return bool(row and row["work"])

    def heartbeat(self, lease: Lease) -> bool:
        return self._rowcount(
            f"""{_NOW} UPDATE jobs SET lease_expires_at = t.now + %s FROM t
                WHERE id = %s AND lease_token = %s AND state = 'PROCESSING'""",
            (self.policy.lease_seconds, lease.job_id, lease.token),
        ) == 1

    def complete(self, lease: Lease, result: JobResult) -> bool:
        return self._finish(lease, JobState.COMPLETED, result=result, error=None)

    def fail(self, lease: Lease, error: str) -> bool:
        return self._finish(lease, JobState.FAILED, result=None, error=error)

    def _finish(self, lease: Lease, state: JobState, *, result: JobResult | None, error: str | None) -> bool:
        params = self._policy_params() | {
            "id": lease.job_id, "token": lease.token, "state": state.value, "error": error,
            "result": Jsonb(dataclasses.asdict(result)) if result else None,
        }

        def run(_retried: bool) -> bool:
            with self._cursor() as cur:
                cur.execute(_FINISH, params)
                if cur.rowcount == 1:
                    return True
                # A retry of a call that already took effect: the job ended in this state under this lease.
                cur.execute("SELECT 1 FROM jobs WHERE id = %s AND lease_token = %s AND state = %s",
                            (lease.job_id, lease.token, state.value))
                return cur.fetchone() is not None

        return self._call(run)

    def report_progress(self, lease: Lease, progress: dict[str, Any]) -> bool:
        return self._rowcount(
            "UPDATE jobs SET progress = %s WHERE id = %s AND lease_token = %s AND state = 'PROCESSING'",
            (Jsonb(progress), lease.job_id, lease.token),
        ) == 1

    def watch_previews(self, job_id: str, seconds: float) -> None:
        self._rowcount(
            """INSERT INTO preview_watchers (job_id, until) VALUES (%(id)s, clock_timestamp() + %(ttl)s)
               ON CONFLICT (job_id) DO UPDATE SET until = excluded.until""",
            {"id": job_id, "ttl": timedelta(seconds=seconds)},
        )

    def previews_watched(self, job_id: str) -> bool:
        row = self._fetch_one(
            "SELECT 1 FROM preview_watchers WHERE job_id = %s AND until > clock_timestamp()", (job_id,)
        )
        return row is not None

    def cancel(self, job_id: str, error: str) -> Job | None:
        self._rowcount(_CANCEL, self._policy_params() | {"id": job_id, "error": error})
        return self.get(job_id)

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        with self._listener.watch(self._ended_channel, job_id) as ended:
            while True:
                job = self.get(job_id)
                remaining = deadline - time.monotonic()
                if job is None or job.state.terminal or remaining <= 0:
                    return job
                ended.wait(min(remaining, _RECHECK_SECONDS))
                ended.clear()

    def expired(self, limit: int = 500) -> list[Job]:
        rows = self._fetch_all(f"{_NOW} SELECT jobs.* FROM jobs, t WHERE expires_at <= t.now ORDER BY expires_at "
                               "LIMIT %s", (limit,))
        return [job_from_record(row) for row in rows]

    def purge_expired(self, job_ids: Sequence[str] | None = None) -> list[Job]:
        # One statement: the jobs go, their deliveries with them (ON DELETE CASCADE), and their preview markers.
        only = "" if job_ids is None else "AND id = ANY(%s)"
        rows = self._fetch_all(
            f"""{_NOW},
            purged AS (DELETE FROM jobs USING t WHERE expires_at <= t.now {only} RETURNING jobs.*),
            watchers AS (DELETE FROM preview_watchers WHERE job_id IN (SELECT id FROM purged))
            SELECT * FROM purged""",
            None if job_ids is None else (list(job_ids),))
        return [job_from_record(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._fetch_all(f"{_NOW} SELECT state, count(*) AS n FROM jobs, t WHERE {_LIVE} GROUP BY state")
        return {state.value: 0 for state in JobState} | {row["state"]: int(row["n"]) for row in rows}

    def ping(self) -> bool:
        try:
            with self.pool.connection() as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:  # PoolTimeout among them
            return False

    def close(self) -> None:
        self._listener.close()
        self.pool.close()


class PostgresOutbox:
    """The webhook outbox beside the jobs (its rows are written by `PostgresJobStore.submit`)."""

    def __init__(self, jobs: PostgresJobStore) -> None:
        self.jobs = jobs
        self.policy = jobs.policy

    def claim_delivery(self, sender_id: str, *, token: str | None = None) -> tuple[Delivery, DeliveryLease] | None:
        """As `Outbox.claim_delivery`; with `token`, a retry returns the delivery the first call leased."""
        given = token is not None
        token = token or self.policy.new_token(sender_id)

        def run(retried: bool) -> DictRow | None:
            with self.jobs._cursor(transaction=True) as cur:
                if given or retried:  # an earlier try may have leased a delivery already, its reply lost
                    row = cur.execute(
                        """SELECT * FROM deliveries
                           WHERE lease_token = %s AND lease_expires_at IS NOT NULL AND state = 'pending'""",
                        (token,),
                    ).fetchone()
                    if row is not None:
                        return row
                return cur.execute(_CLAIM_DELIVERY, {"token": token, "lease": self.policy.lease_seconds}).fetchone()

        row = self.jobs._call(run)
        if row is None:
            return None
        return _delivery_from_row(row), DeliveryLease(row["id"], token)

    def record_attempt(
        self, lease: DeliveryLease, attempt: dict[str, Any], state: DeliveryState, next_attempt_at: float = 0.0
    ) -> bool:
        # The caller's clock says when to retry; the database's clock keeps time, so it travels as a delay.
        delay = next_attempt_at - time.time() if next_attempt_at else None

        def run(_retried: bool) -> bool:
            with self.jobs._cursor() as cur:
                cur.execute(_RECORD_ATTEMPT, {"id": lease.delivery_id, "token": lease.token,
                                              "attempt": Jsonb(attempt), "state": state, "delay": delay})
                if cur.rowcount == 1:
                    return True
                # A retry of a call that already took effect: released under this token with this very attempt.
                cur.execute(
                    """SELECT 1 FROM deliveries
                       WHERE id = %s AND lease_token = %s AND lease_expires_at IS NULL AND state = %s
                         AND attempts -> -1 = %s::jsonb""",
                    (lease.delivery_id, lease.token, state, Jsonb(attempt)),
                )
                return cur.fetchone() is not None

        return self.jobs._call(run)

    def deliveries(self, job_id: str) -> list[Delivery]:
        rows = self.jobs._fetch_all("SELECT * FROM deliveries WHERE job_id = %s ORDER BY seq", (job_id,))
        return [_delivery_from_row(row) for row in rows]


def _slug_filter(slugs: list[str] | None) -> str:
    return "AND slug = ANY(%(slugs)s)" if slugs else ""


def _delivery_from_row(row: DictRow) -> Delivery:
    return Delivery(**{f.name: row[f.name] for f in dataclasses.fields(Delivery)})


def _channel(schema: str, kind: str) -> str:
    name = f"fluxserve:{schema}:{kind}"
    if len(name.encode()) > _MAX_CHANNEL_BYTES:  # a long schema name: a digest names it instead
        name = f"fluxserve:{hashlib.sha256(schema.encode()).hexdigest()[:32]}:{kind}"
    return name


def _payload(key: str) -> str:
    """A key too long for NOTIFY wakes every waiter of its channel instead."""
    return key if len(key.encode()) <= _MAX_PAYLOAD_BYTES else _ANY


# -- waking waiters ------------------------------------------------------------------------------------


class _Listener:
    """One dedicated autocommit connection per store LISTENing on its channels (never a pooled one: the
    pool would hand it to a caller still listening); wakes the threads waiting for the payloads (slugs,
    job ids) it hears. A waiter registers before it reads the state it waits on, so no notification is
    missed while connected; after a reconnect every waiter is woken to re-read the table, since what was
    sent while nobody listened is lost."""

    _RECONNECT_FIRST_S = 0.1
    _RECONNECT_MAX_S = 5.0
    _POLL_S = 0.2  # how long one wait for notifications lasts: bounds how long close() takes
    _READY_WAIT_S = 2.0  # the first waiter waits this long for the first LISTEN

    def __init__(self, conninfo: str, channels: Sequence[str]) -> None:
        self.conninfo = conninfo
        self.channels = tuple(channels)
        self.pid: int | None = None  # the listening backend, while connected
        self._waiters: dict[tuple[str, str], set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ready = threading.Event()  # the first connection attempt is over (listening or not)
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, channel: str, *keys: str) -> Iterator[threading.Event]:
        """An event set when any of `keys` is notified on `channel` (`_ANY`: whatever is notified)."""
        self._ensure_started()
        event = threading.Event()
        with self._lock:
            for key in keys:
                self._waiters.setdefault((channel, key), set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                for key in keys:
                    events = self._waiters.get((channel, key), set())
                    events.discard(event)
                    if not events:
                        self._waiters.pop((channel, key), None)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="postgres-listener", daemon=True)
                self._thread.start()
            started = self._thread is not None
        if started:
            self._ready.wait(self._READY_WAIT_S)

    def _run(self) -> None:
        delay = self._RECONNECT_FIRST_S
        while not self._closed.is_set():
            try:
                self._listen()
            except psycopg.Error as exc:  # the server went away, or refuses us for now
                if not self._closed.is_set():
                    log.warning("PostgreSQL listener: %s; reconnecting", str(exc).strip())
            except Exception:  # never let the thread die: waiters would be left to their re-reads
                log.exception("PostgreSQL listener failed; reconnecting")
            finally:
                if self.pid is not None:  # it was listening: this outage starts the backoff over
                    delay = self._RECONNECT_FIRST_S
                self.pid = None
                self._ready.set()
            self._closed.wait(delay)
            delay = min(delay * 2, self._RECONNECT_MAX_S)

    def _listen(self) -> None:
        # Keepalives: a server that vanished without closing the socket is noticed within a minute.
        conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="fluxserve-listener", keepalives=1, keepalives_idle=30,
                               keepalives_interval=10, keepalives_count=3)
        try:
            with watchdog.guard(conn, CONNECT_TIMEOUT_S):  # a LISTEN whose reply never comes is cut
                for channel in self.channels:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.pid = conn.info.backend_pid
            # Anything may have happened while we were not listening: wake who was waiting, before
            # letting newcomers in (they register now, when no notification can be missed, and a
            # wake-up meant for the ones before would only make them re-read the table for nothing).
            self._wake_all()
            self._ready.set()
            while not self._closed.is_set():
                for notification in conn.notifies(timeout=self._POLL_S):
                    self._wake(notification.channel, notification.payload)
        finally:
            conn.close()

    def _wake(self, channel: str, key: str) -> None:
        with self._lock:
            if key == _ANY:
                events = {event for (ch, _), waiting in self._waiters.items() if ch == channel for event in waiting}
            else:
                events = {*self._waiters.get((channel, key), ()), *self._waiters.get((channel, _ANY), ())}
            for event in events:
                event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._waiters.values():
                for event in events:
                    event.set()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            # Within one poll, unless it is stuck connecting to a silent server: then it ends on its own
            # (a daemon thread) once the connect times out.
            thread.join(timeout=5 * self._POLL_S)
