"""What the routes share: the process's services, absolute URLs, body parsing, job bodies."""

from __future__ import annotations

import json
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from fluxserve.api.errors import bad_request, not_found
from fluxserve.contract import GenerateRequest, JobState, RequestError, parse_request
from fluxserve.jobs import Job
from fluxserve.logs import annotate
from fluxserve.services import Services


def services_of(request: Request) -> Services:
    return request.app.state.services


def base_url(request: Request) -> str:
    return (services_of(request).settings.public_url or str(request.base_url)).rstrip("/")


def job_urls(request: Request, job_id: str) -> dict[str, str]:
    # Absolute: clients (the segmind SDK among them) GET these exactly as given.
    status_url = f"{base_url(request)}/v2/requests/{job_id}/status"
    return {
        "status_url": status_url,
        "poll_url": status_url,
        "response_url": f"{base_url(request)}/v2/requests/{job_id}",
    }


def media_url(request: Request, job: Job) -> str:
    return f"{base_url(request)}/v2/media/{job.result['output_key']}"


async def read_generate_request(request: Request) -> GenerateRequest:
    """The body as a validated GenerateRequest; a 400 naming the problem otherwise."""
    limit = services_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise bad_request(f"Request body too large (limit {limit} bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise bad_request(f"Request body too large (limit {limit} bytes)")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("Request body must be valid JSON") from None
    try:
        return parse_request(payload)
    except RequestError as exc:
        raise bad_request(str(exc)) from None


async def load_job(request: Request, job_id: str) -> Job:
    annotate(job_id=job_id)
    job = await anyio.to_thread.run_sync(services_of(request).store.get, job_id)
    if job is None:
        raise not_found(f"Request {job_id} not found (unknown or expired)")
    return job


def failed_response(job: Job) -> JSONResponse:
    return JSONResponse({"request_id": job.id, "status": JobState.FAILED.value, "error": job.error}, status_code=422)


def result_body(request: Request, job: Job) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
    if job.state is not JobState.COMPLETED:
        return {**body, "output": None, "metrics": {}}
    return {
        **body,
        "output": media_url(request, job),
        "seed": job.params["seed"],
        "outputFormat": job.params["outputFormat"],
        "metrics": {
            **job.result["metrics"],
            "total_time": round((job.finished_at or job.created_at) - job.created_at, 4),
        },
        "created_at": job.created_at,
        "completed_at": job.finished_at,
    }
