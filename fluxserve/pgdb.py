"""PostgreSQL plumbing shared by the PostgreSQL stores: connection pools and versioned migrations.

Each store (jobs and outbox, accounts, outputs) owns its tables and lists its schema as numbered
steps; `migrate` applies the steps a database lacks, under one advisory lock, so replicas starting
together never race on DDL (`fluxserve migrate` runs every component's steps; each store also runs
its own when it opens). Connections are autocommit: a store opens a transaction where it needs one.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# One constant for every migrator: `pg_advisory_xact_lock` serialises them across processes.
_MIGRATION_LOCK = 0x666C7578
# Bounds below any job lease, so a call to a sick database fails fast enough to be retried.
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 8000
POOL_TIMEOUT_S = 3.0
# The versions this process applied, per component (what `fluxserve migrate` reports).
applied_here: dict[str, list[int]] = {}


def _configure(conn: Connection) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.execute("SET idle_in_transaction_session_timeout = 30000")


def open_pool(url: str, *, max_size: int = 8, name: str = "fluxserve") -> ConnectionPool:
    """A pool of autocommit connections returning rows as dicts; each borrow is checked first (one
    round trip), so connections a restarted server dropped are replaced instead of failing a call."""
    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=True,
        name=name,
        timeout=POOL_TIMEOUT_S,
        check=ConnectionPool.check_connection,
        configure=_configure,
        kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S},
    )


def migrate(pool: ConnectionPool, component: str, steps: Sequence[str]) -> list[int]:
    """Apply the steps of `component` the database has not seen (step n is version n+1), in one
    transaction; returns the versions applied now (empty when the schema is current)."""
    with pool.connection() as conn, conn.transaction():
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

