"""The HTTP API: create_app wires the routers, the error handlers and the process's services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI

from fluxserve import __version__
from fluxserve.api import account, control, generate, observability, playground, requests
from fluxserve.api.deps import ServicesDep
from fluxserve.api.errors import ApiError, install_error_handlers
from fluxserve.app.errors import NotFound
from fluxserve.config import Settings
from fluxserve.services import DEMO_WARNING, Services


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()
    services = services or Services(settings)
    app = FastAPI(
        title="fluxserve",
        version=__version__,
        description="Segmind-compatible text-to-image API for FLUX models, self-hosted.",
        lifespan=services_lifespan(services),
    )
    app.state.services = services
    install_error_handlers(app)
    app.get("/health", tags=["service"])(health)
    app.include_router(observability.router)
    app.add_middleware(observability.RequestContext)
    app.include_router(generate.router(settings.model.slug))
    app.include_router(requests.router)
    app.include_router(account.router)
    app.include_router(control.router)
    app.include_router(playground.router)
    # Last: anything unmatched is a JSON 404 (or 405 on the model's own path).
    app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)(
        unknown_route
    )
    return app


def services_lifespan(services: Services) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the process's services with the app; stop them (draining its workers) when it shuts down."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(services.stop)

    return lifespan


async def health(services: ServicesDep) -> dict[str, Any]:
    settings = services.settings
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "model": settings.model.model or "tiny random-weight demo model",
        "slug": settings.model.slug,
        "engine": services.engine.state,
        "demo": services.demo,
    }
    if services.demo:
        body["warning"] = DEMO_WARNING
    if services.engine.error:
        body["engine_error"] = services.engine.error
    return body


async def unknown_route(path: str, services: ServicesDep) -> None:
    if path.startswith(("v1/", "v2/")) and path.count("/") == 1:
        slug = path.split("/", 1)[1]
        if slug == services.settings.model.slug:
            raise ApiError(405, "Method not allowed: use POST")
        raise NotFound(f"Model not found: {slug}")
    raise NotFound("Endpoint not found")
