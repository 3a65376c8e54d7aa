"""`GET /v2/requests/{id}/status`, `GET /v2/requests/{id}` and the media route."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from fluxserve.api.common import failed_response, load_job, result_body, services_of
from fluxserve.api.errors import not_found
from fluxserve.contract import JobState
from fluxserve.jobs import Job
from fluxserve.results import status_body
from fluxserve.webhooks import delivery_view

router = APIRouter(tags=["requests"])


@router.get("/v2/requests/{job_id}/status")
async def request_status(request: Request, job_id: str) -> Any:
    job = await load_job(request, job_id)
    if job.state is JobState.FAILED:
        return failed_response(job)
    position = None
    if job.state is JobState.QUEUED:
        position = await anyio.to_thread.run_sync(services_of(request).store.queue_position, job.id)
    return status_body(job, position)


@router.get("/v2/requests/{job_id}")
async def request_result(request: Request, job_id: str) -> Any:
    job = await load_job(request, job_id)
    webhook = await webhook_section(request, job)
    if job.state is JobState.FAILED:
        return failed_response(job, **webhook)
    return {**result_body(request, job), **webhook}


async def webhook_section(request: Request, job: Job) -> dict[str, Any]:
    """The request's webhook and every delivery attempt so far (nothing when it has no webhook)."""
    if "webhook" not in job.meta:
        return {}
    deliveries = await anyio.to_thread.run_sync(services_of(request).store.deliveries, job.id)
    views = [delivery_view(delivery) for delivery in deliveries]
    return {"webhook": {"url": job.meta["webhook"]["url"], "deliveries": views}}


@router.get("/v2/media/{key}", response_class=Response)
async def media(request: Request, key: str) -> Response:
    job = await load_job(request, key.partition(".")[0], signed_link=True)
    if job.result.get("output_key") != key:
        raise not_found("Media not found")
    outputs = services_of(request).outputs
    link = getattr(outputs, "link", None)  # stores that can hand out pre-signed links
    if link is not None and (url := await anyio.to_thread.run_sync(link, key)):
        return RedirectResponse(url, status_code=307)
    data = await anyio.to_thread.run_sync(outputs.get, key)
    if data is None:
        raise not_found("Media not found")
    return Response(data, media_type=job.result["media_type"], headers={"Cache-Control": "private, max-age=3600"})
