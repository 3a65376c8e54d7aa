"""The HTTP API: the hosted contract's v1 (sync) and v2 (submit + poll) routes, media, health."""

from __future__ import annotations

import base64
import json
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fluxserve import __version__
from fluxserve.api.errors import ApiError, bad_request, install_error_handlers, not_found
from fluxserve.config import Settings
from fluxserve.contract import MEDIA_TYPES, GenerateRequest, JobState, RequestError, parse_request
from fluxserve.jobs import Job, new_job_id
from fluxserve.services import DEMO_WARNING, Services

# v1 callers each hold a thread while they wait for their job; keep them off FastAPI's own pool.
_SYNC_WAITERS = 1000


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()
    services = services or Services(settings)
    waiters = anyio.CapacityLimiter(_SYNC_WAITERS)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        services.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(services.stop)

    app = FastAPI(
        title="fluxserve",
        version=__version__,
        description="Segmind-compatible text-to-image API for FLUX models, self-hosted.",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    store = services.store
    slug_path = f"/{settings.slug}"
    request_body_doc = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
        }
    }

    # -- helpers -------------------------------------------------------------------------------

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    def urls(request: Request, job_id: str) -> dict[str, str]:
        status_url = f"{base_url(request)}/v2/requests/{job_id}/status"
        return {
            "status_url": status_url,
            "poll_url": status_url,
            "response_url": f"{base_url(request)}/v2/requests/{job_id}",
        }

    async def read_generate_request(request: Request) -> GenerateRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise bad_request(f"Request body too large (limit {settings.max_body_bytes} bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise bad_request(f"Request body too large (limit {settings.max_body_bytes} bytes)")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise bad_request("Request body must be valid JSON") from None
        try:
            return parse_request(payload)
        except RequestError as exc:
            raise bad_request(str(exc)) from None

    async def submit(request: Request) -> Job:
        params = await read_generate_request(request)
        if services.engine.state == "failed" and settings.worker:
            raise ApiError(502, f"The model is not available: {services.engine.error}")
        job = Job(id=new_job_id(), slug=settings.slug, params=params.with_resolved_seed().model_dump())
        return await anyio.to_thread.run_sync(store.submit, job)

    async def load_job(job_id: str) -> Job:
        job = await anyio.to_thread.run_sync(store.get, job_id)
        if job is None:
            raise not_found(f"Request {job_id} not found (unknown or expired)")
        return job

    def media_url(request: Request, job: Job) -> str:
        return f"{base_url(request)}/v2/media/{job.result['output_key']}"

    def failed_response(job: Job) -> JSONResponse:
        return JSONResponse(
            {"request_id": job.id, "status": JobState.FAILED.value, "error": job.error}, status_code=422
        )

    def result_body(request: Request, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
        if job.state is JobState.COMPLETED:
            body["output"] = media_url(request, job)
            body["metrics"] = {
                **job.result["metrics"],
                "total_time": round((job.finished_at or job.created_at) - job.created_at, 4),
            }
            body["seed"] = job.params["seed"]
            body["outputFormat"] = job.params["outputFormat"]
            body["created_at"] = job.created_at
            body["completed_at"] = job.finished_at
        else:
            body["output"] = None
            body["metrics"] = {}
        return body

    # -- routes --------------------------------------------------------------------------------

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "model": settings.model or "tiny random-weight demo model",
            "slug": settings.slug,
            "engine": services.engine.state,
            "demo": services.demo,
        }
        if services.demo:
            body["warning"] = DEMO_WARNING
        if services.engine.error:
            body["engine_error"] = services.engine.error
        return body

    @app.post(f"/v1{slug_path}", tags=["generate"], openapi_extra=request_body_doc,
              response_class=Response, responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}})
    async def generate_sync(request: Request) -> Response:
        """Generate and wait: the image bytes (or JSON with base64 when `base64` is true)."""
        job = await submit(request)
        done = await anyio.to_thread.run_sync(
            store.wait_terminal, job.id, settings.sync_timeout_seconds, limiter=waiters
        )
        if done is None:
            raise not_found(f"Request {job.id} expired before it finished")
        if done.state is JobState.FAILED:
            return failed_response(done)
        if done.state is not JobState.COMPLETED:
            raise ApiError(
                504,
                f"The request did not finish within {settings.sync_timeout_seconds:g}s; it is still "
                f"running as request {job.id}: poll {urls(request, job.id)['status_url']}",
            )
        data = services.outputs.get(done.result["output_key"])
        if data is None:
            raise not_found(f"Output of request {job.id} is no longer available")
        headers = {"X-Request-Id": done.id, "X-Seed": str(done.params["seed"])}
        if done.params.get("base64"):
            return JSONResponse(
                {**result_body(request, done), "image": base64.b64encode(data).decode("ascii")},
                headers=headers,
            )
        return Response(data, media_type=done.result["media_type"], headers=headers)

    @app.post(f"/v2{slug_path}", tags=["generate"], openapi_extra=request_body_doc)
    async def generate_async(request: Request) -> dict[str, Any]:
        """Queue a generation; answers at once with the URLs to poll."""
        job = await submit(request)
        return {"request_id": job.id, "status": JobState.QUEUED.value, **urls(request, job.id)}

    @app.get("/v2/requests/{job_id}/status", tags=["requests"])
    async def request_status(job_id: str) -> Any:
        job = await load_job(job_id)
        if job.state is JobState.FAILED:
            return failed_response(job)
        body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
        if job.state is JobState.QUEUED:
            body["queue_position"] = await anyio.to_thread.run_sync(store.queue_position, job.id)
        return body

    @app.get("/v2/requests/{job_id}", tags=["requests"])
    async def request_result(request: Request, job_id: str) -> Any:
        job = await load_job(job_id)
        if job.state is JobState.FAILED:
            return failed_response(job)
        return result_body(request, job)

    @app.get("/v2/media/{key}", tags=["requests"], response_class=Response)
    async def media(key: str) -> Response:
        job_id, _, _ext = key.partition(".")
        job = await load_job(job_id)
        if job.result.get("output_key") != key:
            raise not_found("Media not found")
        data = await anyio.to_thread.run_sync(services.outputs.get, key)
        if data is None:
            raise not_found("Media not found")
        return Response(data, media_type=job.result["media_type"], headers={"Cache-Control": "private, max-age=3600"})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown_route(path: str) -> None:
        if path.startswith(("v1/", "v2/")) and path.count("/") == 1:
            slug = path.split("/", 1)[1]
            if slug == settings.slug:
                raise ApiError(405, "Method not allowed: use POST")
            raise not_found(f"Model not found: {slug}")
        raise not_found("Endpoint not found")

    return app
