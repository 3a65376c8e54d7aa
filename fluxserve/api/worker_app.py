"""The HTTP face of `fluxserve worker`: `/health`, `/ready` (model loaded, store reachable), `/metrics`.

The worker runs inside the app's lifespan, so SIGTERM (which ends the server) drains it: it stops
claiming and finishes the job in hand before the process exits.
"""

from __future__ import annotations

from fastapi import FastAPI

from fluxserve import __version__
from fluxserve.api import observability
from fluxserve.api.app import health, services_lifespan
from fluxserve.api.errors import install_error_handlers
from fluxserve.config import Settings
from fluxserve.services import Services


def create_worker_app(settings: Settings) -> FastAPI:
    services = Services(settings.with_overrides(worker=True), serves_api=False)
    app = FastAPI(title="fluxserve worker", version=__version__, lifespan=services_lifespan(services),
                  openapi_url=None)
    app.state.services = services
    install_error_handlers(app)
    app.get("/health")(health)
    app.include_router(observability.router)
    app.add_middleware(observability.RequestContext)
    return app
