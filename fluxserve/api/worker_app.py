"""The HTTP face of `fluxserve worker`: `/health`, `/ready` (model loaded, store reachable), `/metrics`.

The worker runs inside the app's lifespan. SIGTERM (or SIGINT) drains it while the server goes on
answering: the worker stops claiming and `/ready` answers 503 at once, the job in hand runs to its end,
and only then does the server shut down and the process exit. A second signal during the drain shuts the
server down at once; the job in hand still finishes before the process exits. So a process manager
(Kubernetes' terminationGracePeriodSeconds, compose's stop_grace_period) must allow the longest job.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import anyio
from fastapi import FastAPI

from fluxserve import __version__
from fluxserve.api import observability
from fluxserve.api.app import health
from fluxserve.api.errors import install_error_handlers
from fluxserve.config import Settings
from fluxserve.services import Services

log = logging.getLogger(__name__)

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def create_worker_app(settings: Settings) -> FastAPI:
    services = Services(settings.with_overrides(worker=True), serves_api=False)
    app = FastAPI(title="fluxserve worker", version=__version__, lifespan=worker_lifespan(services),
                  openapi_url=None)
    app.state.services = services
    install_error_handlers(app)
    app.get("/health")(health)
    app.include_router(observability.router)
    app.add_middleware(observability.RequestContext)
    return app


def worker_lifespan(services: Services) -> Callable[[FastAPI], Any]:
    """Start the services with the app, drain on the first signal, stop them when the app shuts down."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        services.start()
        restore = drain_on_signals(services)
        try:
            yield
        finally:
            restore()
            await anyio.to_thread.run_sync(services.stop)

    return lifespan


def drain_on_signals(services: Services) -> Callable[[], None]:
    """Put a drain in front of the server's own SIGTERM/SIGINT handlers: the first signal starts
    `services.drain()` in a thread and hands the signal on once it is over (the server then shuts down);
    a later one is handed on at once. Returns what puts the server's handlers back. Changes nothing
    outside the main thread, or where no handler of the server's is installed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in DRAIN_SIGNALS}
    server_handlers: dict[signal.Signals, Callable[[int, FrameType | None], Any]] = {
        sig: handler for sig, handler in previous.items() if callable(handler)
    }
    if len(server_handlers) != len(previous):
        return lambda: None
    begun = threading.Event()

    def drain_then_exit(sig: signal.Signals) -> None:
        log.warning("%s: draining: no more claims, /ready answers 503; the job in hand finishes first",
                    sig.name)
        try:
            services.drain()
        finally:
            log.info("drained; shutting down")
            server_handlers[sig](sig, None)  # the server's handler only sets flags: safe from this thread

    def on_signal(signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if begun.is_set():
            server_handlers[sig](signum, frame)
            return
        begun.set()
        threading.Thread(target=drain_then_exit, args=(sig,), name="drain", daemon=True).start()

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, on_signal)

    def restore() -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return restore
