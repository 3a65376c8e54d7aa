"""What the routes share: the process's services, absolute URLs, body parsing, job bodies."""

from __future__ import annotations

import json
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from fluxserve.api.auth import authenticate, authorize_job, has_media_signature, signed_media_query
from fluxserve.api.errors import bad_request, not_found
from fluxserve.contract import GenerateRequest, RequestError, parse_request
from fluxserve.jobs import Job
from fluxserve.logs import annotate
from fluxserve.results import failed_body, result_body_at
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


def validate_generate_request(payload: object) -> GenerateRequest:
    try:
        return parse_request(payload)
    except RequestError as exc:
        raise bad_request(str(exc)) from None


async def read_json_body(request: Request) -> object:
    """The decoded JSON body (within the size limit); a 400 otherwise."""
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
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("Request body must be valid JSON") from None


async def load_job(request: Request, job_id: str, *, signed_link: bool = False) -> Job:
    """The job, if the caller may see it (its owner; or anyone holding a signed media link)."""
    caller = None if signed_link and has_media_signature(request, job_id) else await authenticate(request)
    annotate(job_id=job_id)
    job = await anyio.to_thread.run_sync(services_of(request).store.get, job_id)
    if job is None:
        raise not_found(f"Request {job_id} not found (unknown or expired)")
    if caller is not None:
        authorize_job(caller, job)
    return job


def failed_response(job: Job, **extra: Any) -> JSONResponse:
    return JSONResponse({**failed_body(job), **extra}, status_code=422)


def result_body(request: Request, job: Job) -> dict[str, Any]:
    return result_body_at(base_url(request), job, signed_media_query(request, job.id))
