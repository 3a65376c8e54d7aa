"""`POST /v1/{slug}` (generate and wait) and `POST /v2/{slug}` (queue and answer at once)."""

from __future__ import annotations

import base64
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fluxserve.api.admission import admit
from fluxserve.api.auth import authenticate, authorize_model
from fluxserve.api.common import (
    failed_response,
    job_urls,
    read_json_body,
    result_body,
    services_of,
    validate_generate_request,
)
from fluxserve.api.errors import ApiError, not_found
from fluxserve.api.submission import SUBMIT_HEADERS_DOC, store_job, submit_body_schema, take_submit_options
from fluxserve.contract import MEDIA_TYPES, JobState
from fluxserve.jobs import Job, new_job_id
from fluxserve.logs import annotate

# v1 callers each hold a thread while they wait for their job; keep them off FastAPI's own pool.
_SYNC_WAITERS = anyio.CapacityLimiter(1000)

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": submit_body_schema()}},
    },
    "parameters": SUBMIT_HEADERS_DOC,
}


async def submit(request: Request) -> Job:
    services = services_of(request)
    caller = await authenticate(request)
    authorize_model(caller, services.settings.slug)
    payload = await read_json_body(request)
    options = take_submit_options(request, payload)
    params = validate_generate_request(payload)
    if services.engine.state == "failed" and services.settings.worker:
        raise ApiError(502, f"The model is not available: {services.engine.error}")
    job = Job(id=new_job_id(), slug=services.settings.slug, params=params.with_resolved_seed().model_dump(),
              owner=caller.account_id)
    annotate(job_id=job.id)
    return await admit(request, caller, job, options)


def router(slug: str) -> APIRouter:
    api = APIRouter(tags=["generate"])

    @api.post(f"/v1/{slug}", openapi_extra=_BODY_DOC, response_class=Response,
              responses={200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}}})
    async def generate_sync(request: Request) -> Response:
        """Generate and wait: the image bytes (or JSON with base64 when `base64` is true)."""
        services = services_of(request)
        timeout = services.settings.sync_timeout_seconds
        job = await submit(request)
        done = await anyio.to_thread.run_sync(services.store.wait_terminal, job.id, timeout, limiter=_SYNC_WAITERS)
        if done is None:
            raise not_found(f"Request {job.id} expired before it finished")
        if done.state.terminal:  # settled before answering, so the balance is final when v1 returns
            await anyio.to_thread.run_sync(services.settle, done.id)
        if done.state is JobState.FAILED:
            return failed_response(done)
        if done.state is not JobState.COMPLETED:
            raise ApiError(
                504,
                f"The request did not finish within {timeout:g}s; it is still running as request {job.id}: "
                f"poll {job_urls(request, job.id)['status_url']}",
            )
        data = await anyio.to_thread.run_sync(services.outputs.get, done.result["output_key"])
        if data is None:
            raise not_found(f"Output of request {job.id} is no longer available")
        headers = {"X-Request-Id": done.id, "X-Seed": str(done.params["seed"])}
        if done.params.get("base64"):
            body = {**result_body(request, done), "image": base64.b64encode(data).decode("ascii")}
            return JSONResponse(body, headers=headers)
        return Response(data, media_type=done.result["media_type"], headers=headers)

    @api.post(f"/v2/{slug}", openapi_extra=_BODY_DOC)
    async def generate_async(request: Request) -> dict[str, Any]:
        """Queue a generation; answers at once with the URLs to poll."""
        job = await submit(request)
        # An Idempotency-Key replay answers with the first job, in whatever state it is now.
        return {"request_id": job.id, "status": job.state.value, **job_urls(request, job.id)}

    return api
