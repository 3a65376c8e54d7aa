"""The embedded JobStore: one SQLite file in WAL mode.

Every transition is one short transaction. A claim runs under `BEGIN IMMEDIATE`, which takes the
database's write lock up front, so two claimers (threads or processes on the same file) never lease
the same job. Lease tokens make transitions from a worker whose lease lapsed harmless.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fluxserve.contract import JobState
from fluxserve.jobs import Job, Lease

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
"""

_TERMINAL = (JobState.COMPLETED.value, JobState.FAILED.value)
# How often a waiter re-reads the file, to see transitions made by other processes.
_CROSS_PROCESS_POLL_S = 0.25


class SqliteJobStore:
    def __init__(
        self,
        path: Path | str,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        retention_seconds: float = 3600.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.retention_seconds = retention_seconds
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._changed = threading.Condition()
        self._db().executescript(_SCHEMA)

    # -- connections -------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- the protocol --------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        job.state = JobState.QUEUED
        job.created_at = job.created_at or time.time()
        with self._transaction() as db:
            db.execute(
                """INSERT INTO jobs (id, slug, params, state, created_at, owner, meta)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (job.id, job.slug, json.dumps(job.params), job.state.value, job.created_at, job.owner,
                 json.dumps(job.meta)),
            )
        self._notify()
        return job

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

    def claim(self, worker_id: str, slugs: list[str] | None = None) -> tuple[Job, Lease] | None:
        now = time.time()
        slug_filter, slug_args = _slug_clause(slugs)
        with self._transaction() as db:
            self._fail_exhausted(db, now)
            row = db.execute(
                f"""SELECT * FROM jobs
                    WHERE (state = 'QUEUED' OR (state = 'PROCESSING' AND lease_expires_at <= ?))
                    {slug_filter}
                    ORDER BY seq LIMIT 1""",
                (now, *slug_args),
            ).fetchone()
            if row is None:
                return None
            token = f"{worker_id}:{uuid.uuid4().hex}"
            db.execute(
                """UPDATE jobs SET state = 'PROCESSING', attempts = attempts + 1, lease_token = ?,
                       lease_expires_at = ?, started_at = ? WHERE seq = ?""",
                (token, now + self.lease_seconds, now, row["seq"]),
            )
            claimed = db.execute("SELECT * FROM jobs WHERE seq = ?", (row["seq"],)).fetchone()
        self._notify()
        return _job_from_row(claimed), Lease(claimed["id"], token)

    def _fail_exhausted(self, db: sqlite3.Connection, now: float) -> None:
        """Jobs whose lease lapsed after their last allowed attempt end FAILED instead of retrying."""
        db.execute(
            """UPDATE jobs SET state = 'FAILED', error = ?, finished_at = ?, expires_at = ?,
                   lease_token = NULL, lease_expires_at = NULL
               WHERE state = 'PROCESSING' AND lease_expires_at <= ? AND attempts >= ?""",
            (
                f"The worker running this job stopped responding {self.max_attempts} time(s); giving up",
                now,
                now + self.retention_seconds,
                now,
                self.max_attempts,
            ),
        )

    def heartbeat(self, lease: Lease) -> bool:
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET lease_expires_at = ?
                   WHERE id = ? AND lease_token = ? AND state = 'PROCESSING'""",
                (now + self.lease_seconds, lease.job_id, lease.token),
            )
        return cur.rowcount == 1

    def complete(self, lease: Lease, result: dict[str, Any]) -> bool:
        return self._finish(lease, JobState.COMPLETED, result=result, error=None)

    def fail(self, lease: Lease, error: str) -> bool:
        return self._finish(lease, JobState.FAILED, result={}, error=error)

    def _finish(self, lease: Lease, state: JobState, *, result: dict[str, Any], error: str | None) -> bool:
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                """UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = ?, expires_at = ?,
                       lease_token = NULL, lease_expires_at = NULL
                   WHERE id = ? AND lease_token = ? AND state = 'PROCESSING'""",
                (state.value, json.dumps(result), error, now, now + self.retention_seconds,
                 lease.job_id, lease.token),
            )
        self._notify()
        return cur.rowcount == 1

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.state.terminal or remaining <= 0:
                return job
            with self._changed:
                self._changed.wait(min(remaining, _CROSS_PROCESS_POLL_S))

    def purge_expired(self) -> list[Job]:
        now = time.time()
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM jobs WHERE expires_at <= ?", (now,)).fetchall()
            db.execute("DELETE FROM jobs WHERE expires_at <= ?", (now,))
        return [_job_from_row(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._db().execute(
            "SELECT state, COUNT(*) FROM jobs WHERE expires_at IS NULL OR expires_at > ? GROUP BY state",
            (time.time(),),
        ).fetchall()
        return {state: count for state, count in rows}

    def ping(self) -> bool:
        try:
            self._db().execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()


def _slug_clause(slugs: list[str] | None) -> tuple[str, list[str]]:
    if not slugs:
        return "", []
    return f"AND slug IN ({', '.join('?' for _ in slugs)})", list(slugs)


def _job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        slug=row["slug"],
        params=json.loads(row["params"]),
        state=JobState(row["state"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        attempts=row["attempts"],
        lease_token=row["lease_token"],
        lease_expires_at=row["lease_expires_at"],
        result=json.loads(row["result"]),
        error=row["error"],
        owner=row["owner"],
        meta=json.loads(row["meta"]),
    )
