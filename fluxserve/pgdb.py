"""PostgreSQL plumbing shared by the PostgreSQL stores: connection pools, call timeouts and versioned
migrations.

Each store (jobs and outbox, accounts, outputs) owns its tables and lists its schema as numbered
steps; `migrate` applies the steps a database lacks, under one advisory lock, so replicas starting
together never race on DDL (`fluxserve migrate` runs every component's steps; each store also runs
its own when it opens). Connections are autocommit: a store opens a transaction where it needs one.

A reply can be lost after the server ran the statement (a reset connection, a proxy that stalls), and
libpq would wait for it forever: `CallTimeouts` bounds each try of a store call on the client side too
(`ReplyWatchdog` cuts a connection whose try outlived its time), and the job store's budget for one
call, its retries included, is a third of the lease (`CallTimeouts.for_lease`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# One constant for every migrator: `pg_advisory_xact_lock` serialises them across processes.
_MIGRATION_LOCK = 0x666C7578
# A migration may wait behind another process's; its statements are not bound by a store call's timeouts.
_MIGRATION_STATEMENT_TIMEOUT = "120s"
# Bounds for a pool opened without a lease (accounts, media): a call to a sick database fails fast
# enough to be retried.
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 8000
POOL_TIMEOUT_S = 3.0
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30000
# The shortest try a call gets, whatever the lease: below it a busy server's ordinary replies would be cut.
MIN_TRY_SECONDS = 1.0
MAX_TRY_SECONDS = 10.0  # a long lease gets more tries, not longer ones
MAX_TRIES = 3
# The versions this process applied, per component (what `fluxserve migrate` reports).
applied_here: dict[str, list[int]] = {}


@dataclass(frozen=True)
class CallTimeouts:
    """How long one store call may take. A try (waiting for a pooled connection, every statement and
    its reply) lasts at most `per_try`: the server cancels a statement after `statement_ms`, and the
    client cuts the connection (`ReplyWatchdog`) once `per_try` has passed, whatever the server did.
    A caller that retries a lost reply makes every try end within `budget` of the first one's start."""

    budget: float
    per_try: float
    statement_ms: int
    pool: float
    connect: int  # libpq's connect_timeout: whole seconds, 2 at least

    @classmethod
    def for_lease(cls, lease_seconds: float) -> CallTimeouts:
        """A call, its retries included, fits in a third of the lease (or in one try of
        MIN_TRY_SECONDS, for a lease shorter than 3 of them): a heartbeat that met a lost reply still
        renews the lease in time."""
        budget = lease_seconds / 3
        tries = max(1, min(MAX_TRIES, math.floor(budget / MIN_TRY_SECONDS)))
        per_try = min(MAX_TRY_SECONDS, max(MIN_TRY_SECONDS, budget / tries))
        return cls(budget=max(budget, per_try), per_try=per_try, statement_ms=int(per_try * 800),
                   pool=per_try / 2, connect=max(2, math.ceil(per_try)))

    @classmethod
    def without_lease(cls) -> CallTimeouts:
        return cls(budget=POOL_TIMEOUT_S + STATEMENT_TIMEOUT_MS / 1000, per_try=0.0,
                   statement_ms=STATEMENT_TIMEOUT_MS, pool=POOL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)

    @property
    def cuts(self) -> bool:
        """Whether tries are cut on the client side (pools opened for a lease)."""
        return self.per_try > 0


class ReplyWatchdog:
    """Cuts (shuts down the socket of) a connection still inside a try once its deadline passed: the
    blocked call then fails at once with an OperationalError, the pool drops the connection, and the
    caller may retry. One thread for the process, asleep until the earliest deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Connection]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._ids = itertools.count()
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, conn: Connection, seconds: float) -> Iterator[None]:
        """Cut `conn` if the block is still running `seconds` from now."""
        handle = self._arm(conn, time.monotonic() + seconds)
        try:
            yield
        finally:
            with self._cond:
                self._armed.pop(handle, None)

    def _arm(self, conn: Connection, deadline: float) -> int:
        with self._cond:
            handle = next(self._ids)
            self._armed[handle] = (deadline, conn)
            heapq.heappush(self._deadlines, (deadline, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="postgres-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wake_at:
                self._cond.notify()
        return handle

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, handle = heapq.heappop(self._deadlines)
                    armed = self._armed.pop(handle, None)
                    if armed is not None:
                        _cut(armed[1])
                while self._deadlines and self._deadlines[0][1] not in self._armed:
                    heapq.heappop(self._deadlines)  # disarmed in time
                self._wake_at = self._deadlines[0][0] if self._deadlines else math.inf
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _cut(conn: Connection) -> None:
    try:
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # closed meanwhile: nothing to cut
        return
    log.warning("PostgreSQL did not answer in time; dropping the connection (the call may be retried)")


watchdog = ReplyWatchdog()


def open_pool(url: str, *, max_size: int = 8, name: str = "fluxserve",
              lease_seconds: float | None = None) -> ConnectionPool:
    """A pool of autocommit connections returning rows as dicts; each borrow is checked first (one
    round trip), so connections a restarted server dropped are replaced instead of failing a call.
    With `lease_seconds`, the timeouts are `CallTimeouts.for_lease(lease_seconds)`: the borrow check and
    the session set-up are cut like a try, and the store arms `watchdog` around each of its tries."""
    timeouts = CallTimeouts.for_lease(lease_seconds) if lease_seconds is not None else CallTimeouts.without_lease()

    def configure(conn: Connection) -> None:
        with _guarded(conn, timeouts):
            conn.execute(f"SET statement_timeout = {timeouts.statement_ms}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT_MS}")

    def check(conn: Connection) -> None:
        with _guarded(conn, timeouts):
            ConnectionPool.check_connection(conn)

    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=True,
        name=name,
        timeout=timeouts.pool,
        check=check,
        configure=configure,
        kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": timeouts.connect},
    )


def _guarded(conn: Connection, timeouts: CallTimeouts) -> contextlib.AbstractContextManager[None]:
    return watchdog.guard(conn, timeouts.per_try) if timeouts.cuts else nullcontext()


def migrate(pool: ConnectionPool, component: str, steps: Sequence[str]) -> list[int]:
    """Apply the steps of `component` the database has not seen (step n is version n+1), in one
    transaction; returns the versions applied now (empty when the schema is current)."""
    with pool.connection() as conn, conn.transaction():
        conn.execute(f"SET LOCAL statement_timeout = '{_MIGRATION_STATEMENT_TIMEOUT}'")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS fluxserve_schema (
                   component  text NOT NULL,
                   version    int NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (component, version))"""
        )
        row = conn.execute(
            "SELECT coalesce(max(version), 0) AS v FROM fluxserve_schema WHERE component = %s", (component,)
        ).fetchone()
        current = int(row["v"]) if row else 0  # type: ignore[call-overload,unused-ignore]
        applied = []
        for version, ddl in enumerate(steps, start=1):
            if version > current:
                conn.execute(ddl)  # type: ignore[arg-type,unused-ignore]  # our own constant DDL
                conn.execute("INSERT INTO fluxserve_schema (component, version) VALUES (%s, %s)", (component, version))
                applied.append(version)
        applied_here.setdefault(component, []).extend(applied)
        return applied
