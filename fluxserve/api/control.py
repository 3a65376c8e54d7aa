"""Following and stopping a request: `POST /v2/requests/{id}/cancel` and `GET /v2/requests/{id}/events`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from fluxserve.api.deps import CallerDep, ServicesDep, base_url, write_lane
from fluxserve.contract import JobState
from fluxserve.jobs import Job
from fluxserve.logs import annotate
from fluxserve.services import Services
from fluxserve.views import failed_body, status_body

log = logging.getLogger(__name__)

router = APIRouter(tags=["requests"])

EVENTS_POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
# A `?preview=true` stream marks its job watched for this long, renewed every PREVIEW_RENEW_SECONDS: the
# worker makes previews only while the mark lives, so a stream that vanishes costs them at most this long.
PREVIEW_WATCH_SECONDS = 15.0
PREVIEW_RENEW_SECONDS = 5.0


@router.post("/v2/requests/{job_id}/cancel")
async def cancel_request(request: Request, job_id: str, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """Cancel a QUEUED or PROCESSING request: it ends FAILED with an error saying it was cancelled.

    A queued request never runs; a running one stops at its next denoising step."""
    annotate(job_id=job_id)
    job = await write_lane(request).run(services.control.cancel, caller, job_id)
    return failed_body(job)


@router.get(
    "/v2/requests/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def request_events(
    request: Request, job_id: str, services: ServicesDep, caller: CallerDep, preview: bool = False
) -> StreamingResponse:
    """Server-Sent Events: a `status` event whenever the status body changes (with `queue_position`
    or `progress`; `?preview=true` adds a small JPEG data URL of the current latent), then one
    `completed` or `failed` event with the result body, and the stream ends."""
    annotate(job_id=job_id)
    await anyio.to_thread.run_sync(services.results.find, caller, job_id)
    return StreamingResponse(
        _events(request, services, job_id, preview),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(request: Request, services: Services, job_id: str, preview: bool) -> AsyncIterator[str]:
    results = services.results
    base = base_url(request, services)
    last: dict[str, Any] | None = None
    last_sent = time.monotonic()
    watch = _PreviewWatch(services, job_id) if preview else None
    while not await request.is_disconnected():
        if watch is not None:
            await watch.renew()  # before the first poll, then every few seconds until the job ends
        job = await anyio.to_thread.run_sync(services.jobs.get, job_id)
        if job is None:
            yield _event("error", {"error": f"Request {job_id} expired"})
            return
        if job.state.terminal:
            final = _last_progress(job, preview)
            if final is not None and final != last:
                yield _event("status", final)  # a fast finish must not hide the last step from the stream
            yield _event(job.state.value.lower(), results.body(job, base))
            return
        body = await anyio.to_thread.run_sync(partial(results.status, job, preview=preview))
        if body != last:
            yield _event("status", body)
            last, last_sent = body, time.monotonic()
        elif time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(EVENTS_POLL_SECONDS)


class _PreviewWatch:
    """Keeps the job's preview marker live (`JobStore.watch_previews`) while a stream follows it."""

    def __init__(self, services: Services, job_id: str) -> None:
        self.services, self.job_id = services, job_id
        self._renewed: float | None = None
        self._warned = False

    async def renew(self) -> None:
        if self._renewed is not None and time.monotonic() - self._renewed < PREVIEW_RENEW_SECONDS:
            return
        self._renewed = time.monotonic()
        try:
            await anyio.to_thread.run_sync(self.services.jobs.watch_previews, self.job_id, PREVIEW_WATCH_SECONDS)
        except Exception as exc:  # previews are best-effort: the stream goes on without them
            if not self._warned:
                self._warned = True
                log.warning("could not mark the previews of job %s watched (%s: %s); streaming without them",
                            self.job_id, type(exc).__name__, exc)


def _last_progress(job: Job, preview: bool) -> dict[str, Any] | None:
    """The status body of a completed job's final progress report, as it read while PROCESSING."""
    if job.state is not JobState.COMPLETED or not job.progress:
        return None
    return status_body(replace(job, state=JobState.PROCESSING), preview=preview)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
