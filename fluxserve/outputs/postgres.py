"""Output media in PostgreSQL, shared by every API replica and worker (one `FLUXSERVE_STORE` for all).

Each image is one row of `media` (key, bytes, created_at). The column is stored EXTERNAL: images are
already compressed, so PostgreSQL does not try again, and `substring()` then reads only the TOAST
chunks it returns. That is how the API streams an image a chunk at a time, each chunk on a pooled
connection borrowed for that one query (a slow client never holds a connection).

The janitor deletes media with their job; with `ttl_seconds` set, a put also deletes rows older than
that now and then (at most once a minute per process), a safety net for when no janitor runs, as the
Redis store's key TTL is.

Every call is run again after a lost reply (`pgdb.StoreCalls`: a reset connection, a reply held past
the try's time and cut): a put is an upsert of the same bytes, a delete of a gone row deletes nothing,
and reads change nothing, so a re-run answers as the first run would have.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from fluxserve.outputs import CHUNK_BYTES
from fluxserve.pgdb import CallTimeouts, StoreCalls, migrate, open_pool

COMPONENT = "outputs"
# Step n is schema version n (see fluxserve.pgdb.migrate): append, never edit.
SCHEMA: tuple[str, ...] = (
    """CREATE TABLE media (
           key        text PRIMARY KEY,
           data       bytea NOT NULL,
           created_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
    "ALTER TABLE media ALTER COLUMN data SET STORAGE EXTERNAL",
    "CREATE INDEX media_created_at ON media (created_at)",
)
SWEEP_INTERVAL_SECONDS = 60.0

log = logging.getLogger(__name__)


class PostgresOutputStore:
    def __init__(self, pool: ConnectionPool, *, ttl_seconds: float | None = None, owns_pool: bool = False,
                 timeouts: CallTimeouts | None = None) -> None:
        self.pool = pool
        self._calls = StoreCalls(pool, timeouts or CallTimeouts.for_requests())
        self.ttl_seconds = ttl_seconds
        self._owns_pool = owns_pool
        self._swept_at = float("-inf")
        self._sweep_lock = threading.Lock()
        migrate(pool, COMPONENT, SCHEMA)

    @classmethod
    def from_url(cls, url: str, **options) -> PostgresOutputStore:
        timeouts = CallTimeouts.for_requests()
        pool = open_pool(url, name="fluxserve-outputs", timeouts=timeouts)
        try:
            return cls(pool, owns_pool=True, timeouts=timeouts, **options)
        except BaseException:
            pool.close()
            raise

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def put(self, key: str, data: bytes) -> None:
        # %b: the bytes travel in binary, not hex-escaped (twice the size) as text parameters would.
        self._calls.rowcount(
            """INSERT INTO media (key, data) VALUES (%s, %b)
               ON CONFLICT (key) DO UPDATE SET data = excluded.data, created_at = clock_timestamp()""",
            (key, data),
        )
        self._maybe_sweep()

    def get(self, key: str) -> bytes | None:
        row = self._calls.fetch_one("SELECT data FROM media WHERE key = %s", (key,), binary=True)
        return bytes(row["data"]) if row else None

    def delete(self, key: str) -> None:
        self._calls.rowcount("DELETE FROM media WHERE key = %s", (key,))

    def link(self, key: str) -> str | None:
        return None  # served through the API

    def file_path(self, key: str) -> Path | None:
        return None

    def iter_chunks(self, key: str) -> Iterator[bytes] | None:
        row = self._calls.fetch_one("SELECT octet_length(data) AS size FROM media WHERE key = %s", (key,))
        if row is None:
            return None
        return self._ranges(key, int(row["size"]))

    def _ranges(self, key: str, size: int) -> Iterator[bytes]:
        for start in range(0, size, CHUNK_BYTES):
            row = self._calls.fetch_one(
                "SELECT substring(data FROM %s FOR %s) AS chunk FROM media WHERE key = %s",
                (start + 1, CHUNK_BYTES, key),  # substring counts from 1
                binary=True,
            )
            chunk = bytes(row["chunk"]) if row else b""
            if not chunk:  # deleted while it was being read
                return
            yield chunk

    def sweep_expired(self) -> int:
        """Delete the media older than `ttl_seconds` (none without a TTL); returns how many."""
        if not self.ttl_seconds:
            return 0
        # A re-run (the first run's reply lost) counts only what was left: the count is for the log.
        return self._calls.rowcount(
            "DELETE FROM media WHERE created_at < clock_timestamp() - make_interval(secs => %s)",
            (float(self.ttl_seconds),),
        )

    def _maybe_sweep(self) -> None:
        if not self.ttl_seconds:
            return
        now = time.monotonic()
        with self._sweep_lock:
            if now - self._swept_at < SWEEP_INTERVAL_SECONDS:
                return
            self._swept_at = now
        try:
            self.sweep_expired()
        except (psycopg.Error, OSError) as exc:  # the put itself succeeded: a missed sweep waits for the next
            log.warning("expired media sweep failed: %s", exc)
