"""`/ready`, `/metrics`, and the request context (request id + access log) of every HTTP request."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import anyio
import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from psycopg_pool import ConnectionPool

from fluxserve.api.deps import ServicesDep
from fluxserve.dbfile import SqliteFile
from fluxserve.logs import log_context, new_request_id
from fluxserve.metrics import CONTENT_TYPE
from fluxserve.services import Services
from fluxserve.store_faults import StoreUnavailable

access_log = logging.getLogger("fluxserve.access")

router = APIRouter(tags=["service"])

# Probes are scraped every few seconds: keep them out of the INFO access log.
_QUIET_PATHS = ("/health", "/ready", "/metrics")
# A request id handed in by a load balancer or client is kept when it looks like one.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


# /ready's answer is reused this long, so probes (and anyone hammering /ready) cost the store at most one
# small write a second; and a probe gets this long before the store counts as not answering.
READY_CACHE_SECONDS = 1.0
READY_PROBE_SECONDS = 1.0
# A write probe waits this long for the store's write lock.
WRITE_PROBE_SECONDS = 0.5


def write_probe(store: object, timeout: float = WRITE_PROBE_SECONDS) -> None:
    """Whether the job store takes writes now; raises what a real write would meet. SQLite commits a
    row in a table of its own (waiting `timeout` for the lock); Redis sets a key that expires (refused
    when it is out of memory, read-only or cannot persist); PostgreSQL answers whether it is read-only
    (a standby, or default_transaction_read_only) within `timeout`."""
    file = getattr(store, "file", None)
    if isinstance(file, SqliteFile):
        file.probe_write(timeout)
        return
    client, prefix = getattr(store, "client", None), getattr(store, "prefix", "fluxserve")
    if isinstance(client, redis.Redis):
        client.set(f"{prefix}:ready-probe", str(time.time()), px=60_000)
        return
    pool = getattr(store, "pool", None)
    if isinstance(pool, ConnectionPool):
        with pool.connection(timeout=timeout) as conn, conn.transaction():
            conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            row = conn.execute("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
                               " AS read_only").fetchone()
        if row is None or _first(row):
            raise StoreUnavailable("the database is read-only")


def _first(row: object) -> object:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]  # type: ignore[index]


class ReadinessProbe:
    """The checks behind /ready, run in a thread at most once per `cache_seconds` (concurrent calls share
    one run) and never waited on longer than `probe_seconds`: a store that hangs makes /ready a quick
    503, and a probe still hanging is not started twice."""

    def __init__(self, services: Services, cache_seconds: float = READY_CACHE_SECONDS,
                 probe_seconds: float = READY_PROBE_SECONDS) -> None:
        self.services = services
        self.cache_seconds = cache_seconds
        self.probe_seconds = probe_seconds
        self._answer: dict[str, str] | None = None
        self._fresh_until = 0.0
        self._lock: anyio.Lock | None = None
        self._probing = threading.Event()  # set while a probe's thread runs (one that hangs included)

    async def checks(self) -> dict[str, str]:
        if self._answer is not None and time.monotonic() < self._fresh_until:
            return self._answer
        if self._lock is None:  # made on the app's event loop
            self._lock = anyio.Lock()
        async with self._lock:
            if self._answer is None or time.monotonic() >= self._fresh_until:
                self._answer = await self._run()
                self._fresh_until = time.monotonic() + self.cache_seconds
            return self._answer

    async def _run(self) -> dict[str, str]:
        answer: dict[str, str] | None = None
        if not self._probing.is_set():
            with anyio.move_on_after(self.probe_seconds):
                answer = await anyio.to_thread.run_sync(self._probe, abandon_on_cancel=True)
        if answer is None:
            answer = {"store": f"not answering within {self.probe_seconds:g}s"}
            if self.services.settings.worker.embedded:
                answer["engine"] = self.services.engine.state
        return answer

    def _probe(self) -> dict[str, str]:
        self._probing.set()
        try:
            checks = self.services.readiness()
            if checks.get("store") == "ok":
                try:
                    write_probe(self.services.jobs)
                except Exception as exc:
                    checks["store"] = f"cannot take writes ({type(exc).__name__}: {_one_line(exc)})"
            return checks
        finally:
            self._probing.clear()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def readiness_probe(request: Request) -> ReadinessProbe:
    probe = getattr(request.app.state, "readiness", None)
    if probe is None:
        probe = request.app.state.readiness = ReadinessProbe(request.app.state.services)
    return probe


@router.get("/ready")
async def ready(request: Request) -> Any:
    """200 when this process can do its job: the store takes writes, and (if it runs jobs) the model is
    loaded; else 503 saying what is wrong. Checked at most once a second."""
    checks = await readiness_probe(request).checks()
    problems = [f"{name} {state}" for name, state in checks.items() if state not in ("ok", "ready")]
    if problems:
        return JSONResponse({"error": f"Not ready: {', '.join(problems)}", **checks}, status_code=503,
                            headers={"Retry-After": "1"})
    return {"status": "ready", **checks}


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics of this process."""
    body = await anyio.to_thread.run_sync(services.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


class RequestContext:
    """ASGI middleware: a request id for every log record of the request, and one access log line."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else new_request_id()
        status = 500
        started = time.perf_counter()

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_and_note_status)
            finally:
                path = scope["path"]
                access_log.log(
                    logging.DEBUG if path in _QUIET_PATHS else logging.INFO,
                    "%s %s %d", scope["method"], path, status,
                    extra={"status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
                )
