"""`/ready`, `/metrics`, and the request context (request id + access log) of every HTTP request."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from fluxserve.api.deps import ServicesDep
from fluxserve.logs import log_context, new_request_id
from fluxserve.metrics import CONTENT_TYPE

access_log = logging.getLogger("fluxserve.access")

router = APIRouter(tags=["service"])

# Probes are scraped every few seconds: keep them out of the INFO access log.
_QUIET_PATHS = ("/health", "/ready", "/metrics")
# A request id handed in by a load balancer or client is kept when it looks like one.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@router.get("/ready")
async def ready(services: ServicesDep) -> Any:
    """200 when this process can do its job: store reachable, and (if it runs jobs) model loaded."""
    checks = await anyio.to_thread.run_sync(services.readiness)
    problems = [f"{name} {state}" for name, state in checks.items() if state not in ("ok", "ready")]
    if problems:
        return JSONResponse({"error": f"Not ready: {', '.join(problems)}", **checks}, status_code=503)
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
