"""`GET /v2/requests/{id}/status`, `GET /v2/requests/{id}` and the media route."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from fluxserve.api.deps import (
    CallerDep,
    ServicesDep,
    base_url,
    caller_on_thread,
    failed_response,
    presented_key,
    read_lane,
    services_in,
)
from fluxserve.contract import JobState
from fluxserve.logs import annotate

router = APIRouter(tags=["requests"])


# The route clients poll resolves its services and caller itself (FastAPI's dependency solving costs
# about a fifth of its CPU) and answers with a JSONResponse, not a dict (FastAPI's generic encoding
# of a returned dict costs more than the store read).
@router.get("/v2/requests/{job_id}/status", response_class=JSONResponse)
async def request_status(request: Request, job_id: str) -> Any:
    annotate(job_id=job_id)
    services = services_in(request)
    caller = caller_on_thread(request, services)

    def read() -> Any:
        job = services.results.find(caller(), job_id)
        return failed_response(job) if job.state is JobState.FAILED else JSONResponse(services.results.status(job))

    return await read_lane(request).run(read)


@router.get("/v2/requests/{job_id}", response_class=JSONResponse)
async def request_result(request: Request, job_id: str, services: ServicesDep, caller: CallerDep) -> Any:
    annotate(job_id=job_id)
    results = services.results

    def read() -> Any:
        job = results.find(caller, job_id)
        webhook = results.webhook_section(job)
        if job.state is JobState.FAILED:
            return failed_response(job, **webhook)
        return JSONResponse({**results.body(job, base_url(request, services)), **webhook})

    return await anyio.to_thread.run_sync(read)


@router.get("/v2/media/{key}", response_class=Response)
async def media(request: Request, key: str, services: ServicesDep) -> Response:
    """The image; with the result's signed link (`?sig=`) no API key is needed."""
    annotate(job_id=key.partition(".")[0])
    key_given = presented_key(request)
    found = await anyio.to_thread.run_sync(
        services.results.media, key, dict(request.query_params), lambda: services.access.authenticate(key_given)
    )
    if found.link:
        return RedirectResponse(found.link, status_code=307)
    headers = {"Cache-Control": "private, max-age=3600"}
    if found.path is not None:  # sent from the file, in pieces, with Range support
        return FileResponse(found.path, media_type=found.media_type, headers=headers)
    return StreamingResponse(found.chunks or iter(()), media_type=found.media_type, headers=headers)
