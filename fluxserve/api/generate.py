"""`POST /v1/{slug}` (generate and wait) and `POST /v2/{slug}` (queue and answer at once)."""

from __future__ import annotations

import base64
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fluxserve.api.common import failed_response, job_urls, read_generate_request, result_body, services_of
from fluxserve.api.errors import ApiError, not_found
from fluxserve.contract import MEDIA_TYPES, GenerateRequest, JobState
from fluxserve.jobs import Job, new_job_id
from fluxserve.logs import annotate

# v1 callers each hold a thread while they wait for their job; keep them off FastAPI's own pool.
_SYNC_WAITERS = anyio.CapacityLimiter(1000)

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
    }
}


async def submit(request: Request) -> Job:
    services = services_of(request)
    params = await read_generate_request(request)
    if services.engine.state == "failed" and services.settings.worker:
        raise ApiError(502, f"The model is not available: {services.engine.error}")
    job = Job(id=new_job_id(), slug=services.settings.slug, params=params.with_resolved_seed().model_dump())
    annotate(job_id=job.id)
    return await anyio.to_thread.run_sync(services.store.submit, job)


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
        return {"request_id": job.id, "status": JobState.QUEUED.value, **job_urls(request, job.id)}

    return api
