"""PostgreSQL plumbing shared by the PostgreSQL stores: connection pools, call timeouts and versioned
migrations.

Each store (jobs and outbox, accounts, outputs) owns its tables and lists its schema as numbered
steps; `migrate` applies the steps a database lacks, under one advisory lock, so replicas starting
together never race on DDL (`fluxserve migrate` runs every component's steps; each store also runs
its own when it opens). Connections are autocommit: a store opens a transaction where it needs one.

A reply can be lost after the server ran the statement (a reset connection, a proxy that stalls), and
libpq would wait for it forever: `CallTimeouts` bounds each try of a store call on the client side too
(`ReplyWatchdog` cuts a connection whose try outlived its time), and the job store's budget for one
call, its retries included, is a third of the lease (`CallTimeouts.for_lease`); the accounts and media
stores, which hold no lease, get `CallTimeouts.for_requests`. Every store makes its calls through
`StoreCalls`, which runs a call again after a transient fault: each store's calls answer a re-run with
the same arguments as they answered the first run.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg import Connection, Cursor
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from fluxserve.store_faults import is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

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
# psycopg_pool re-opens a lost connection with pauses doubling without a cap (1, 2, 4, 8, 16 s...), so
# after a long outage a slot came back tens of seconds after the server did, and every borrow failed
# meanwhile. Giving a slot up after this long frees it: the next borrow that finds the pool empty
# opens one at once.
RECONNECT_GIVE_UP_S = 3.0
# The shortest try a call gets, whatever the lease: below it a busy server's ordinary replies would be cut.
MIN_TRY_SECONDS = 1.0
MAX_TRY_SECONDS = 10.0  # a long lease gets more tries, not longer ones
MAX_TRIES = 3
# A call of the accounts or media store (no lease to fit in): each try at most REQUEST_TRY_SECONDS
# (as a Redis account call waits at most 5 s for a reply), the call and its re-runs at most
# REQUEST_BUDGET_SECONDS.
REQUEST_TRY_SECONDS = 5.0
REQUEST_BUDGET_SECONDS = 12.0
# Re-runs after a transient fault: a pause doubling from the first figure up to the second, at most
# _RUNS runs in all (a run may be a transaction of several statements, each of which may lose its
# reply), and none in a remainder of the budget shorter than the last figure.
_RETRY_FIRST_S = 0.02
_RETRY_CAP_S = 0.5
_RUNS = 10
_RETRY_MIN_WINDOW_S = 0.25
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
    def for_requests(cls) -> CallTimeouts:
        """The accounts and media stores' calls: tries cut after REQUEST_TRY_SECONDS, re-runs while
        REQUEST_BUDGET_SECONDS last."""
        per_try = REQUEST_TRY_SECONDS
        return cls(budget=REQUEST_BUDGET_SECONDS, per_try=per_try, statement_ms=int(per_try * 800),
                   pool=min(POOL_TIMEOUT_S, per_try / 2), connect=CONNECT_TIMEOUT_S)

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
              lease_seconds: float | None = None, timeouts: CallTimeouts | None = None) -> ConnectionPool:
    """A pool of autocommit connections returning rows as dicts; each borrow is checked first (one
    round trip), so connections a restarted server dropped are replaced instead of failing a call.
    With `lease_seconds`, the timeouts are `CallTimeouts.for_lease(lease_seconds)` (or `timeouts`, given):
    the borrow check and the session set-up are cut like a try, and the store arms `watchdog` around
    each of its tries (`StoreCalls`)."""
    if timeouts is None:
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
        reconnect_timeout=RECONNECT_GIVE_UP_S,
        check=check,
        configure=configure,
        kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": timeouts.connect},
    )


class StoreCalls:
    """How a store talks to PostgreSQL: each try on a pooled connection, cut once its time is up, and
    a call run again after a transient fault while its budget lasts."""

    def __init__(self, pool: ConnectionPool, timeouts: CallTimeouts) -> None:
        self.pool = pool
        self.timeouts = timeouts
        self._local = threading.local()  # the deadline of the call this thread is making

    @contextmanager
    def cursor(self, *, transaction: bool = False) -> Iterator[Cursor[DictRow]]:
        """A cursor on a pooled autocommit connection (one statement, one transaction), or inside an
        explicit transaction; the try (the borrow included) is cut once its time is up."""
        started = time.monotonic()
        deadline = getattr(self._local, "deadline", None)
        seconds = self.timeouts.per_try if deadline is None else min(self.timeouts.per_try, deadline - started)
        seconds = max(seconds, _RETRY_MIN_WINDOW_S)
        with self.pool.connection(timeout=min(self.timeouts.pool, seconds)) as conn, \
                watchdog.guard(conn, seconds - (time.monotonic() - started)):
            if transaction:
                with conn.transaction():
                    yield conn.cursor(row_factory=dict_row)
            else:
                yield conn.cursor(row_factory=dict_row)

    def call(self, run: Callable[[bool], T]) -> T:
        """`run(retried)`, run again (`retried` True) after a transient fault met once a request may have
        gone out, while the call's budget lasts. The first try may have taken effect before its reply was
        lost: every transition answers a re-run with the same arguments as it answered the first. A call
        that got no connection (PoolTimeout: nothing was sent) is not re-run: the store is down, the
        caller's own policy applies (the worker retries, the API answers 503). A call made inside
        another (a `run` that calls again) shares the outer call's deadline."""
        outer = getattr(self._local, "deadline", None)
        deadline = time.monotonic() + self.timeouts.budget if outer is None else outer
        self._local.deadline = deadline
        delay, retried, runs = _RETRY_FIRST_S, False, 0
        try:
            while True:
                runs += 1
                try:
                    return run(retried)
                except Exception as exc:
                    if (not is_transient(exc) or isinstance(exc, PoolTimeout) or runs >= _RUNS
                            or deadline - time.monotonic() - delay < _RETRY_MIN_WINDOW_S):
                        raise
                    log.info("PostgreSQL call failed (%s: %s); running it again", type(exc).__name__,
                             str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                time.sleep(delay)
                delay, retried = min(delay * 2, _RETRY_CAP_S), True
        finally:
            self._local.deadline = outer

    def fetch_one(self, query: str, params: Any = None, *, binary: bool = False) -> DictRow | None:
        """One statement whose re-run answers as the first run did (a read, an idempotent write)."""
        def run(_retried: bool) -> DictRow | None:
            with self.cursor() as cur:
                return cur.execute(query, params, binary=binary).fetchone()

        return self.call(run)

    def fetch_all(self, query: str, params: Any = None) -> list[DictRow]:
        def run(_retried: bool) -> list[DictRow]:
            with self.cursor() as cur:
                return cur.execute(query, params).fetchall()

        return self.call(run)

    def rowcount(self, query: str, params: Any = None) -> int:
        """Run one statement whose re-run changes nothing more (and matches as many rows); its row count."""
        def run(_retried: bool) -> int:
            with self.cursor() as cur:
                return cur.execute(query, params).rowcount

        return self.call(run)


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
