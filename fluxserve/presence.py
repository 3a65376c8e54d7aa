"""Which models the fleet's workers serve now: each worker advertises its models in the shared store.

Every process that runs jobs (`fluxserve worker`, or `serve` with its embedded worker) writes one advert
per model it serves, with its state (`loading`, `ready`, `failed` and why), and renews it every third
of `FLUXSERVE_WORKER_PRESENCE_SECONDS`; an advert not renewed in time lapses (a worker that died), and a
worker that stops withdraws its own at once. Every API replica reads them (`PresenceView`, cached for a
second) to answer a submit for a model no live worker serves with 503 instead of queueing a job that
would wait forever.

The adverts live in the store the jobs live in, opened from the same URL:
- SQLite: a table beside the jobs (`model_presence`), expiry by the host's clock (one host);
- Redis: one key per worker, `{prefix}:presence:{worker id}`, and an index of them by expiry
  (`{prefix}:presence`), timed by Redis's own clock;
- PostgreSQL: a table (`fluxserve_model_presence`, migrated on open), expiry by the server's clock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fluxserve.dbfile import SqliteFile
from fluxserve.pgdb import migrate, open_pool
from fluxserve.redisconn import connect

log = logging.getLogger(__name__)

SERVING = ("loading", "ready")  # a model still loading counts as served: its jobs queue meanwhile
FAILED = "failed"


@dataclass(frozen=True)
class ModelState:
    """One model's state in one worker."""

    state: str  # loading | ready | failed
    error: str | None = None


@dataclass(frozen=True)
class Advert:
    worker_id: str
    slug: str
    state: str
    error: str | None = None


class Presence(Protocol):
    """The adverts of the live workers, in the shared store."""

    def advertise(self, worker_id: str, models: Mapping[str, ModelState], ttl: float) -> None:
        """Replace this worker's adverts by `models`, each valid for `ttl` seconds from now."""
        ...

    def withdraw(self, worker_id: str) -> None:
        """Remove this worker's adverts (it stops)."""
        ...

    def live(self) -> list[Advert]:
        """Every advert that has not lapsed."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class FleetView:
    """The live adverts at one moment, as the submit path asks about them."""

    adverts: tuple[Advert, ...] = ()

    @property
    def workers(self) -> set[str]:
        return {advert.worker_id for advert in self.adverts}

    def serving(self, slug: str) -> bool:
        return any(advert.slug == slug and advert.state in SERVING for advert in self.adverts)

    def errors(self, slug: str) -> list[str]:
        return [advert.error or "it failed to load" for advert in self.adverts
                if advert.slug == slug and advert.state == FAILED]

    def states(self, slug: str) -> list[str]:
        return sorted(advert.state for advert in self.adverts if advert.slug == slug)

    def without(self, worker_id: str | None) -> FleetView:
        """The view less one worker's adverts (none left out for None)."""
        if worker_id is None:
            return self
        return FleetView(tuple(advert for advert in self.adverts if advert.worker_id != worker_id))


@dataclass
class PresenceView:
    """The fleet's adverts for the API, read at most once per `max_age` seconds (concurrent callers share
    a read); `fresh()` re-reads unless the cached read is younger than `min_age`."""

    presence: Presence
    max_age: float = 1.0
    min_age: float = 0.2
    _view: FleetView | None = None
    _error: Exception | None = None
    _read_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> FleetView:
        return self._read(self.max_age)

    def fresh(self) -> FleetView:
        return self._read(self.min_age)

    def _read(self, age: float) -> FleetView:
        """The cached view, or a new read; a read that failed is not tried again within `max_age` (its
        error is raised again), so a store outage costs one slow call a second, not one per submit."""
        with self._lock:
            if self._error is not None and time.monotonic() - self._read_at < self.max_age:
                raise self._error.with_traceback(None)
            if self._view is None or self._error is not None or time.monotonic() - self._read_at >= age:
                self._read_at = time.monotonic()
                try:
                    self._view, self._error = FleetView(tuple(self.presence.live())), None
                except Exception as exc:
                    self._error = exc
                    raise
            return self._view


# -- SQLite --------------------------------------------------------------------------------------

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_presence (
    worker_id  TEXT NOT NULL,
    slug       TEXT NOT NULL,
    state      TEXT NOT NULL,
    error      TEXT,
    expires_at REAL NOT NULL,
    PRIMARY KEY (worker_id, slug)
)
"""


class SqlitePresence:
    def __init__(self, path: Path) -> None:
        self.file = SqliteFile(path)
        self._ready = False  # the table is made at first use (a store busy at start-up fails no process)

    def _table(self) -> None:
        if not self._ready:
            with self.file.transaction() as db:
                db.execute(SQLITE_SCHEMA)
            self._ready = True

    def advertise(self, worker_id: str, models: Mapping[str, ModelState], ttl: float) -> None:
        self._table()
        now = time.time()
        with self.file.transaction() as db:
            db.execute("DELETE FROM model_presence WHERE worker_id = ? OR expires_at <= ?", (worker_id, now))
            db.executemany(
                "INSERT INTO model_presence (worker_id, slug, state, error, expires_at) VALUES (?, ?, ?, ?, ?)",
                [(worker_id, slug, model.state, model.error, now + ttl) for slug, model in models.items()],
            )

    def withdraw(self, worker_id: str) -> None:
        self._table()
        with self.file.transaction() as db:
            db.execute("DELETE FROM model_presence WHERE worker_id = ?", (worker_id,))

    def live(self) -> list[Advert]:
        self._table()
        rows = self.file.db().execute(
            "SELECT worker_id, slug, state, error FROM model_presence WHERE expires_at > ? ORDER BY worker_id, slug",
            (time.time(),),
        ).fetchall()
        return [Advert(row["worker_id"], row["slug"], row["state"], row["error"]) for row in rows]

    def close(self) -> None:
        self.file.close()


# -- Redis ---------------------------------------------------------------------------------------


class RedisPresence:
    """One key per worker (its adverts, expiring with PX) and an index of the workers by expiry (a sorted
    set), both timed by Redis's clock: a read looks at the index, never scans the key space."""

    def __init__(self, client: Any, prefix: str = "fluxserve") -> None:
        self.client = client
        self.prefix = prefix
        self.index = f"{prefix}:presence"

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "fluxserve") -> RedisPresence:
        return cls(connect(url, socket_timeout=5), prefix=prefix)

    def _key(self, worker_id: str) -> str:
        return f"{self.prefix}:presence:{worker_id}"

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def advertise(self, worker_id: str, models: Mapping[str, ModelState], ttl: float) -> None:
        value = json.dumps({slug: {"state": model.state, "error": model.error} for slug, model in models.items()})
        now = self._now()
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key(worker_id), value, px=max(1, int(ttl * 1000)))
        pipe.zadd(self.index, {worker_id: now + ttl})
        pipe.zremrangebyscore(self.index, "-inf", now)
        pipe.execute()

    def withdraw(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key(worker_id))
        pipe.zrem(self.index, worker_id)
        pipe.execute()

    def live(self) -> list[Advert]:
        workers = [w.decode() if isinstance(w, bytes) else w
                   for w in self.client.zrangebyscore(self.index, f"({self._now()}", "+inf")]
        if not workers:
            return []
        adverts = []
        for worker_id, value in zip(sorted(workers), self.client.mget([self._key(w) for w in sorted(workers)]),
                                    strict=True):
            if value is None:  # lapsed since
                continue
            for slug, model in json.loads(value).items():
                adverts.append(Advert(worker_id, slug, model["state"], model.get("error")))
        return adverts

    def close(self) -> None:
        self.client.close()


# -- PostgreSQL ----------------------------------------------------------------------------------

POSTGRES_COMPONENT = "presence"
POSTGRES_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS fluxserve_model_presence (
           worker_id  text NOT NULL,
           slug       text NOT NULL,
           state      text NOT NULL,
           error      text,
           expires_at timestamptz NOT NULL,
           PRIMARY KEY (worker_id, slug))""",
]


class PostgresPresence:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._ready = False  # migrated at first use (a database down at start-up fails no process)
        self._lock = threading.Lock()

    def ensure_table(self) -> None:
        """Apply the adverts' schema (at first use, or by `fluxserve migrate`)."""
        if not self._ready:
            with self._lock:
                if not self._ready:
                    migrate(self.pool, POSTGRES_COMPONENT, POSTGRES_SCHEMA)
                    self._ready = True

    @classmethod
    def from_url(cls, url: str) -> PostgresPresence:
        return cls(open_pool(url, max_size=2, name="fluxserve-presence"))

    def advertise(self, worker_id: str, models: Mapping[str, ModelState], ttl: float) -> None:
        self.ensure_table()
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("DELETE FROM fluxserve_model_presence WHERE worker_id = %s OR expires_at <= now()",
                         (worker_id,))
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO fluxserve_model_presence (worker_id, slug, state, error, expires_at) "
                    "VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))",
                    [(worker_id, slug, model.state, model.error, ttl) for slug, model in models.items()],
                )

    def withdraw(self, worker_id: str) -> None:
        self.ensure_table()
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM fluxserve_model_presence WHERE worker_id = %s", (worker_id,))

    def live(self) -> list[Advert]:
        self.ensure_table()
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT worker_id, slug, state, error FROM fluxserve_model_presence WHERE expires_at > now() "
                "ORDER BY worker_id, slug"
            ).fetchall()
        return [Advert(row["worker_id"], row["slug"], row["state"], row["error"]) for row in rows]

    def close(self) -> None:
        self.pool.close()


class Advertiser:
    """A thread that keeps this process's adverts current until stopped, then withdraws them."""

    def __init__(self, presence: Presence, worker_id: str, models: Mapping[str, Any], ttl: float) -> None:
        # `models`: slug → anything with `state` and `error` (the engine slots), read at each renewal.
        self.presence = presence
        self.worker_id = worker_id
        self.models = models
        self.ttl = ttl
        self._stop = threading.Event()
        self._renew = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def renew_now(self) -> None:
        """Advertise at once (a model's state changed)."""
        self._renew.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._renew.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def advertise_once(self) -> None:
        states = {slug: ModelState(slot.state, slot.error) for slug, slot in self.models.items()}
        self.presence.advertise(self.worker_id, states, self.ttl)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.advertise_once()
                if self._failing:
                    log.info("model presence is advertised again")
                self._failing = False
            except Exception as exc:  # the next renewal retries; one line per outage
                if not self._failing:
                    log.warning("advertising this worker's models failed (%s: %s); retrying", type(exc).__name__, exc)
                self._failing = True
            self._renew.wait(self.ttl / 3)
            self._renew.clear()
        try:
            self.presence.withdraw(self.worker_id)
        except Exception as exc:  # its adverts lapse on their own
            log.warning("withdrawing this worker's models failed (%s: %s)", type(exc).__name__, exc)
