"""`POST /v1/{slug}` (generate and wait) and `POST /v2/{slug}` (queue and answer at once)."""

from __future__ import annotations

import base64

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fluxserve.api.deps import (
    base_url,
    caller_on_thread,
    failed_response,
    job_urls,
    read_body,
    services_in,
    write_lane,
)
from fluxserve.app.submit import SubmitHeaders, submit_body_schema
from fluxserve.contract import MEDIA_TYPES, JobState
from fluxserve.jobs import Job
from fluxserve.logs import annotate
from fluxserve.services import Services

# v1 callers each hold a thread while they wait for their job; keep them off FastAPI's own pool.
_SYNC_WAITERS = anyio.CapacityLimiter(1000)

SUBMIT_HEADERS_DOC = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "Retry-safe submit: the same key and body give the same request_id",
    },
    {
        "name": "Cancel-After",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1},
        "description": "Deadline: seconds, or a duration such as '90s' or '5m'",
    },
]
_BODY_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": submit_body_schema()}}},
    "parameters": SUBMIT_HEADERS_DOC,
}


async def submit(request: Request, services: Services, slug: str) -> Job:
    """The submit use case in one thread hop, the caller's authentication included."""
    caller = caller_on_thread(request, services)
    body = await read_body(request, services.settings.api.max_body_bytes)
    headers = SubmitHeaders(request.headers.get("idempotency-key"), request.headers.get("cancel-after"))
    base = base_url(request, services)
    job = await write_lane(request).run(
        lambda: services.submitter.submit(caller(), body, headers, base, slug=slug))
    annotate(job_id=job.id)
    return job


def router(slug: str) -> APIRouter:
    api = APIRouter(tags=["generate"])

    @api.post(f"/v1/{slug}", openapi_extra=_BODY_DOC, response_class=Response,
              responses={200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}}})
    async def generate_sync(request: Request) -> Response:
        """Generate and wait: the image bytes (or JSON with base64 when `base64` is true)."""
        services = services_in(request)  # as generate_async, without FastAPI's dependency solving
        job = await submit(request, services, slug)
        base = base_url(request, services)
        done, data = await anyio.to_thread.run_sync(
            services.results.wait, job, services.settings.api.sync_timeout_seconds,
            job_urls(base, job.id)["status_url"], limiter=_SYNC_WAITERS,
        )
        if done.state is JobState.FAILED or data is None or done.result is None:
            return failed_response(done)
        headers = {"X-Request-Id": done.id, "X-Seed": str(done.params.seed)}
        if done.params.base64:
            body = {**services.results.body(done, base), "image": base64.b64encode(data).decode("ascii")}
            return JSONResponse(body, headers=headers)
        return Response(data, media_type=done.result.media_type, headers=headers)

    @api.post(f"/v2/{slug}", openapi_extra=_BODY_DOC, response_class=JSONResponse)
    async def generate_async(request: Request) -> JSONResponse:
        """Queue a generation; answers at once with the URLs to poll."""
        # The hottest route resolves its services and caller itself: FastAPI's dependency solving
        # costs about a fifth of a submit's CPU, a thread hop for the caller as much again.
        services = services_in(request)
        job = await submit(request, services, slug)
        # An Idempotency-Key replay answers with the first job, in whatever state it is now.
        # A response, not a dict: FastAPI's generic encoding of a returned dict costs more than the submit.
        return JSONResponse({"request_id": job.id, "status": job.state.value,
                             **job_urls(base_url(request, services), job.id)})

    return api
