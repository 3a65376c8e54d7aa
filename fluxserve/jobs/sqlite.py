"""The embedded JobStore and Outbox: one SQLite file in WAL mode.

Every transition is one short transaction. A claim runs under `BEGIN IMMEDIATE`, which takes the
database's write lock up front, so two claimers (threads or processes on the same file) never lease
the same job. Lease tokens make transitions from a worker whose lease lapsed harmless. An ended job
keeps the token it ended under (a cancel or an exhausted retry budget clears it), so a retried
`complete` / `fail` is recognised.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from fluxserve.contract import JobState
from fluxserve.dbfile import SqliteFile
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
from fluxserve.jobs.policy import LeasePolicy, idempotency_scope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    slug             TEXT NOT NULL,
    params           TEXT NOT NULL,
    state            TEXT NOT NULL,
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    expires_at       REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_token      TEXT,
    lease_expires_at REAL,
    result           TEXT NOT NULL DEFAULT '{}',
    error            TEXT,
    owner            TEXT,
    meta             TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_runnable ON jobs (state, slug, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
-- Who follows a job's previews, until when (epoch seconds): see JobStore.watch_previews.
CREATE TABLE IF NOT EXISTS preview_watchers (
    job_id TEXT PRIMARY KEY,
    until  REAL NOT NULL
);
"""

# Progress, idempotency keys and the webhook outbox. Columns are added to a jobs table made by an
# older version (`_JOB_COLUMNS`), so an existing data directory keeps working.
_JOB_COLUMNS = {"progress": "TEXT", "idem_key": "TEXT", "idem_fingerprint": "TEXT"}
_OUTBOX_SCHEMA = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (idem_key) WHERE idem_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    job_id           TEXT NOT NULL,
    url              TEXT NOT NULL,
    trigger          TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    attempts         TEXT NOT NULL DEFAULT '[]',
    next_attempt_at  REAL NOT NULL DEFAULT 0,
    lease_token      TEXT,
    lease_expires_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id);
"""

_TERMINAL = (JobState.COMPLETED.value, JobState.FAILED.value)
# How often a waiter re-reads the file, to see transitions made by other processes.
_CROSS_PROCESS_POLL_S = 0.25


class SqliteJobStore:
    def __init__(self, path: Path | str, policy: LeasePolicy | None = None) -> None:
        self.file = SqliteFile(path)
        self.path = self.file.path
        self.policy = policy or LeasePolicy()
        self._changed = threading.Condition()
        self._db().executescript(_SCHEMA)
        self._add_missing_columns()
        self._db().executescript(_OUTBOX_SCHEMA)

    def _add_missing_columns(self) -> None:
        with self._transaction() as db:
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _JOB_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def outbox(self) -> SqliteOutbox:
        return SqliteOutbox(self)

    # -- connections -------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        return self.file.db()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self.file.transaction()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- the protocol --------------------------------------------------------------------------

    def submit(
        self, job: Job, *, deliveries: Sequence[Delivery] = (), idempotency: IdempotencyKey | None = None
    ) -> Job:
        job.state = JobState.QUEUED
        job.created_at = job.created_at or time.time()
        idem_key = idempotency_scope(idempotency) if idempotency else None
        with self._transaction() as db:
            if idempotency is not None and idem_key is not None:
                holder = self._idempotency_holder(db, idem_key, idempotency.fingerprint)
                if holder is not None:
                    return holder
            record = job_record(job)
            db.execute(
                """INSERT INTO jobs (id, slug, params, state, created_at, owner, meta,
                                     idem_key, idem_fingerprint)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (job.id, job.slug, json.dumps(record["params"]), record["state"], job.created_at,
                 job.owner, json.dumps(record["meta"]), idem_key, idempotency.fingerprint if idempotency else None),
            )
            db.executemany(
                """INSERT INTO deliveries (id, job_id, url, trigger, state, attempts, next_attempt_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(d.id, job.id, d.url, d.trigger, d.state, json.dumps(d.attempts), d.next_attempt_at)
                 for d in deliveries],
            )
        self._notify()
        return job

    def find_idempotent(self, idempotency: IdempotencyKey) -> Job | None:
        row = self._db().execute(
            "SELECT * FROM jobs WHERE idem_key = ? AND (expires_at IS NULL OR expires_at > ?)",
            (idempotency_scope(idempotency), time.time()),
        ).fetchone()
        if row is None:
            return None
        if row["idem_fingerprint"] != idempotency.fingerprint:
            raise IdempotencyConflict(row["id"])
        return _job_from_row(row)

    def _idempotency_holder(self, db: sqlite3.Connection, idem_key: str, fingerprint: str) -> Job | None:
        """The live job holding the key (or IdempotencyConflict); an expired holder gives the key up."""
        row = db.execute("SELECT * FROM jobs WHERE idem_key = ?", (idem_key,)).fetchone()
        if row is None:
            return None
        if row["expires_at"] is not None and row["expires_at"] <= time.time():
            db.execute("UPDATE jobs SET idem_key = NULL WHERE seq = ?", (row["seq"],))
            return None
        if row["idem_fingerprint"] != fingerprint:  # checked under the write lock: one winner
            raise IdempotencyConflict(row["id"])
        return _job_from_row(row)

    def get(self, job_id: str) -> Job | None:
        row = self._db().execute(
            "SELECT * FROM jobs WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
            (job_id, time.time()),
        ).fetchone()
        return _job_from_row(row) if row else None

    def queue_position(self, job_id: str) -> int | None:
        job = self.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return None
        (ahead,) = self._db().execute(
            """SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED' AND slug = ?
                 AND seq < (SELECT seq FROM jobs WHERE id = ?)""",
            (job.slug, job_id),
        ).fetchone()
        return int(ahead)

    def claim(
        self, worker_id: str, slugs: list[str] | None = None, *, token: str | None = None
    ) -> tuple[Job, Lease] | None:
        now = time.time()
        slug_filter, slug_args = _slug_clause(slugs)
        with self._transaction() as db:
            if token is not None:  # a retry of a claim that already took effect answers the same lease
                held = db.execute(
                    "SELECT * FROM jobs WHERE state = 'PROCESSING' AND lease_token = ?", (token,)
                ).fetchone()
                if held is not None:
                    return _job_from_row(held), Lease(held["id"], token)
            reclaimable = self._settle_lapsed(db, now)
            if slugs:
                reclaimable = [row for row in reclaimable if row["slug"] in slugs]
            queued = db.execute(
                f"SELECT seq FROM jobs WHERE state = 'QUEUED' {slug_filter} ORDER BY seq LIMIT 1", slug_args
            ).fetchone()
            candidates = [row["seq"] for row in reclaimable] + ([queued["seq"]] if queued else [])
            if not candidates:
                return None
            seq = min(candidates)  # the oldest: a reclaimed job keeps its place in line
            token = token if token is not None else self.policy.new_token(worker_id)
            db.execute(
                """UPDATE jobs SET state = 'PROCESSING', attempts = attempts + 1, lease_token = ?,
                       lease_expires_at = ?, started_at = ?, progress = NULL WHERE seq = ?""",
                (token, now + self.policy.lease_seconds, now, seq),
            )
            claimed = db.execute("SELECT * FROM jobs WHERE seq = ?", (seq,)).fetchone()
        self._notify()
        return _job_from_row(claimed), Lease(claimed["id"], token)

    def _settle_lapsed(self, db: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
        """PROCESSING jobs whose lease lapsed at least `policy.reclaim_delay(attempts)` ago: those that
        used their last allowed attempt end FAILED; the others (returned) may be claimed again. A lapsed
        job still inside its delay waits, as PROCESSING."""
        lapsed = db.execute(
            """SELECT seq, slug, attempts, lease_expires_at FROM jobs
               WHERE state = 'PROCESSING' AND lease_expires_at <= ?""",
            (now,),
        ).fetchall()
        due = [row for row in lapsed
               if row["lease_expires_at"] + self.policy.reclaim_delay(row["attempts"]) <= now]
        exhausted = [(row["seq"],) for row in due if row["attempts"] >= self.policy.max_attempts]
        db.executemany(
            """UPDATE jobs SET state = 'FAILED', error = ?, finished_at = ?, expires_at = ?,
                   lease_token = NULL, lease_expires_at = NULL
               WHERE seq = ?""",
            [(self.policy.exhausted_error, now, now + self.policy.retention_seconds, seq) for (seq,) in exhausted],
        )
        return [row for row in due if row["attempts"] < self.policy.max_attempts]

    def heartbeat(self, lease: Lease) -> bool:
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET lease_expires_at = ?
                   WHERE id = ? AND lease_token = ? AND state = 'PROCESSING'""",
                (now + self.policy.lease_seconds, lease.job_id, lease.token),
            )
        return cur.rowcount == 1

    def complete(self, lease: Lease, result: JobResult) -> bool:
        return self._finish(lease, JobState.COMPLETED, result=result, error=None)

    def fail(self, lease: Lease, error: str) -> bool:
        return self._finish(lease, JobState.FAILED, result=None, error=error)

    def _finish(self, lease: Lease, state: JobState, *, result: JobResult | None, error: str | None) -> bool:
        now = time.time()
        with self._transaction() as db:
            # The token stays on the ended row: it is how a retry of this call is recognised.
            cur = db.execute(
                """UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = ?, expires_at = ?,
                       lease_expires_at = NULL
                   WHERE id = ? AND lease_token = ? AND state = 'PROCESSING'""",
                (state.value, json.dumps(dataclasses.asdict(result) if result else None), error, now,
                 now + self.policy.retention_seconds, lease.job_id, lease.token),
            )
            if cur.rowcount == 0:  # a retry of a call that already ended the job this way: done
                return db.execute(
                    "SELECT 1 FROM jobs WHERE id = ? AND lease_token = ? AND state = ?",
                    (lease.job_id, lease.token, state.value),
                ).fetchone() is not None
        self._notify()
        return True

    def report_progress(self, lease: Lease, progress: dict[str, Any]) -> bool:
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND lease_token = ? AND state = 'PROCESSING'",
                (json.dumps(progress), lease.job_id, lease.token),
            )
        return cur.rowcount == 1

    def watch_previews(self, job_id: str, seconds: float) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute("DELETE FROM preview_watchers WHERE until < ?", (now,))  # lapsed markers: nobody reads them
            db.execute(
                """INSERT INTO preview_watchers (job_id, until) VALUES (?, ?)
                   ON CONFLICT (job_id) DO UPDATE SET until = excluded.until""",
                (job_id, now + seconds),
            )

    def previews_watched(self, job_id: str) -> bool:
        row = self._db().execute(
            "SELECT 1 FROM preview_watchers WHERE job_id = ? AND until > ?", (job_id, time.time())
        ).fetchone()
        return row is not None

    def cancel(self, job_id: str, error: str) -> Job | None:
        now = time.time()
        with self._transaction() as db:
            # The lease is revoked: the worker's next report, heartbeat or result (a retry included) is refused.
            cur = db.execute(
                """UPDATE jobs SET state = 'FAILED', error = ?, finished_at = ?, expires_at = ?,
                       lease_token = NULL, lease_expires_at = NULL
                   WHERE id = ? AND state IN ('QUEUED', 'PROCESSING')""",
                (error, now, now + self.policy.retention_seconds, job_id),
            )
        if cur.rowcount:
            self._notify()
        return self.get(job_id)

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.state.terminal or remaining <= 0:
                return job
            with self._changed:
                self._changed.wait(min(remaining, _CROSS_PROCESS_POLL_S))

    def wait_for_work(self, slugs: list[str] | None, timeout: float) -> None:
        # Woken by any change made through this store (a submit among them); a submit by another
        # process on the file is seen at the timeout.
        with self._changed:
            self._changed.wait(timeout)

    def expired(self, limit: int = 500) -> list[Job]:
        rows = self._db().execute(
            "SELECT * FROM jobs WHERE expires_at <= ? ORDER BY expires_at LIMIT ?", (time.time(), limit)
        ).fetchall()
        return [_job_from_row(row) for row in rows]

    def purge_expired(self, job_ids: Sequence[str] | None = None) -> list[Job]:
        now = time.time()
        ids = None if job_ids is None else list(job_ids)
        # The ids asked for go in chunks (SQLite limits a statement's parameters); None: every expired job.
        chunks: list[list[str] | None] = [None] if ids is None else [ids[i:i + 500] for i in range(0, len(ids), 500)]
        rows: list[sqlite3.Row] = []
        with self._transaction() as db:
            for chunk in chunks:
                only = "" if chunk is None else f"AND id IN ({', '.join('?' for _ in chunk)})"
                args = (now, *(chunk or ()))
                rows += db.execute(f"SELECT * FROM jobs WHERE expires_at <= ? {only}", args).fetchall()
                for table in ("deliveries", "preview_watchers"):  # what goes with the job
                    db.execute(f"DELETE FROM {table} WHERE job_id IN "
                               f"(SELECT id FROM jobs WHERE expires_at <= ? {only})", args)
                db.execute(f"DELETE FROM jobs WHERE expires_at <= ? {only}", args)
        return [_job_from_row(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._db().execute(
            "SELECT state, COUNT(*) FROM jobs WHERE expires_at IS NULL OR expires_at > ? GROUP BY state",
            (time.time(),),
        ).fetchall()
        return dict(rows)

    def ping(self) -> bool:
        try:
            self._db().execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        self.file.close()


class SqliteOutbox:
    """The webhook outbox in the jobs' file (its rows are written by `SqliteJobStore.submit`)."""

    def __init__(self, jobs: SqliteJobStore) -> None:
        self.file = jobs.file
        self.policy = jobs.policy

    def claim_delivery(self, sender_id: str, *, token: str | None = None) -> tuple[Delivery, DeliveryLease] | None:
        """As `Outbox.claim_delivery`; with `token`, a retry of a claim that already took effect answers the
        same delivery and lease."""
        now = time.time()
        with self.file.transaction() as db:
            if token is not None:
                held = db.execute(
                    "SELECT * FROM deliveries WHERE state = 'pending' AND lease_token = ?", (token,)
                ).fetchone()
                if held is not None:
                    return _delivery_from_row(held), DeliveryLease(held["id"], token)
            row = db.execute(
                """SELECT d.* FROM deliveries d JOIN jobs j ON j.id = d.job_id
                   WHERE d.state = 'pending' AND d.next_attempt_at <= ?
                     AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= ?)
                     AND ((d.trigger = 'finished' AND j.state IN ('COMPLETED', 'FAILED'))
                          OR (d.trigger = 'started' AND j.started_at IS NOT NULL))
                   ORDER BY d.next_attempt_at, d.seq LIMIT 1""",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            token = token if token is not None else self.policy.new_token(sender_id)
            db.execute(
                "UPDATE deliveries SET lease_token = ?, lease_expires_at = ? WHERE seq = ?",
                (token, now + self.policy.lease_seconds, row["seq"]),
            )
        return _delivery_from_row(row), DeliveryLease(row["id"], token)

    def record_attempt(
        self, lease: DeliveryLease, attempt: dict[str, Any], state: DeliveryState, next_attempt_at: float = 0.0
    ) -> bool:
        with self.file.transaction() as db:
            row = db.execute(
                "SELECT attempts FROM deliveries WHERE id = ? AND lease_token = ? AND state = 'pending'",
                (lease.delivery_id, lease.token),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                """UPDATE deliveries SET attempts = ?, state = ?, next_attempt_at = ?,
                       lease_token = NULL, lease_expires_at = NULL WHERE id = ?""",
                (json.dumps([*json.loads(row["attempts"]), attempt]), state, next_attempt_at, lease.delivery_id),
            )
        return True

    def deliveries(self, job_id: str) -> list[Delivery]:
        rows = self.file.db().execute(
            "SELECT * FROM deliveries WHERE job_id = ? ORDER BY seq", (job_id,)
        ).fetchall()
        return [_delivery_from_row(row) for row in rows]


def _slug_clause(slugs: list[str] | None) -> tuple[str, list[str]]:
    if not slugs:
        return "", []
    return f"AND slug IN ({', '.join('?' for _ in slugs)})", list(slugs)


def _delivery_from_row(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        job_id=row["job_id"],
        url=row["url"],
        trigger=row["trigger"],
        state=row["state"],
        attempts=json.loads(row["attempts"]),
        next_attempt_at=row["next_attempt_at"],
    )


def _job_from_row(row: sqlite3.Row) -> Job:
    record: dict[str, Any] = dict(row)
    for name in ("params", "result", "meta", "progress"):
        record[name] = json.loads(record[name]) if record[name] else None
    return job_from_record(record)
