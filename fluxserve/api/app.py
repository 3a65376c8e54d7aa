"""The HTTP API: create_app wires the routers, the error handlers and the process's services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve import __version__
from fluxserve.api import (
    account,
    control,
    generate,
    loras,
    models,
    observability,
    openai_images,
    openapi,
    playground,
    requests,
    security,
)
from fluxserve.api.deps import ServicesDep, ThreadLane, thread_lanes
from fluxserve.api.errors import ApiError, install_error_handlers
from fluxserve.app.errors import NotFound
from fluxserve.config import Settings
from fluxserve.services import DEMO_WARNING, Services


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()
    services = services or Services(settings)
    lanes = thread_lanes()
    app = FastAPI(
        title="fluxserve",
        version=__version__,
        description="Segmind-compatible text-to-image API for FLUX models, self-hosted.",
        lifespan=services_lifespan(services, lanes),
        docs_url=None,  # served by api/openapi.py, without a CDN
        redoc_url=None,  # no offline ReDoc asset: /docs only
    )
    app.state.services = services
    # Store writes and status reads on threads of their own, so a slow store never starves reads and
    # /ready (api/deps.py).
    for name, lane in lanes.items():
        setattr(app.state, name, lane)
    app.state.readiness = observability.ReadinessProbe(services)
    install_error_handlers(app)
    app.get("/health", tags=["service"])(health)
    app.include_router(observability.router)
    for slug in services.directory.slugs:  # /v1/{slug} and /v2/{slug} for every served model
        app.include_router(generate.router(slug))
    app.include_router(models.router)
    app.include_router(loras.router)
    app.include_router(openai_images.router)
    app.include_router(requests.router)
    app.include_router(account.router)
    app.include_router(control.router)
    app.include_router(playground.router)
    app.include_router(openapi.router)
    openapi.install_openapi(app)
    # Last: anything unmatched is a 405 with Allow on a known path, else a JSON 404.
    app.api_route("/{path:path}", methods=CATCH_ALL_METHODS, include_in_schema=False)(unknown_route)

    # Middleware, innermost first (each add wraps the ones before it).
    app.add_middleware(HeadAsGet)
    app.add_middleware(security.JsonBodiesOnly)
    origins = security.cors_origins(settings)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=security.CORS_HEADERS, expose_headers=security.CORS_EXPOSED)
    app.add_middleware(security.HostCheck, policy=security.HostPolicy(settings, services.access.enforced))
    app.add_middleware(security.SecurityHeaders)
    app.add_middleware(observability.RequestContext)
    return app


def services_lifespan(
    services: Services, lanes: dict[str, ThreadLane]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the process's services with the app; stop them (draining its workers) and its thread lanes
    when it shuts down."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(services.stop)
            for lane in lanes.values():
                lane.close()

    return lifespan


async def health(services: ServicesDep) -> dict[str, Any]:
    settings = services.settings
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "model": settings.model.model or ("tiny random-weight demo model" if services.demo else None),
        "slug": settings.model.slug,
        "engine": services.engine.state,
        "demo": services.demo,
    }
    if services.demo:
        body["warning"] = DEMO_WARNING
    if services.engine.error:
        body["engine_error"] = services.engine.error
    # Every served model: its state in this process's worker, or `external` (other processes run it).
    body["models"] = {slug: services.engines[slug].state if slug in services.engines else "external"
                      for slug in services.models}
    return body


CATCH_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def unknown_route(request: Request, path: str) -> None:
    allowed = allowed_methods(request.app, "/" + path)
    if allowed:
        raise ApiError(405, f"Method not allowed: use {', '.join(allowed)}", {"Allow": ", ".join(allowed)})
    if path.startswith(("v1/", "v2/")) and path.count("/") == 1:
        raise NotFound(f"Model not found: {path.split('/', 1)[1]}")
    raise NotFound("Endpoint not found")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of every route (but the catch-all) whose path matches; HEAD wherever GET is."""
    methods: set[str] = set()
    for route in openapi.all_routes(app):
        regex = getattr(route, "path_regex", None)
        if route.endpoint is not unknown_route and regex is not None and regex.match(path):
            methods |= route.methods or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET would be, headers only (routes are declared for GET, and
    Starlette's responses would send a HEAD body). A streamed answer is cut after its headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def send_headers_only(message: Message) -> None:
            nonlocal done
            if done:
                return
            if message["type"] == "http.response.body":
                done = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def receive_until_done() -> Message:
            # Once answered, the client is gone as far as the route is concerned: a stream stops.
            return {"type": "http.disconnect"} if done else await receive()

        await self.app({**scope, "method": "GET"}, receive_until_done, send_headers_only)
