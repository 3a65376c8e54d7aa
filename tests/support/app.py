"""The real app in-process: `create_app(settings, Services(settings, engine_loader=...))` driven over
HTTP in-process. Starlette's TestClient, used as a context manager, runs the app's lifespan (the
embedded worker, the janitor and the webhook senders start and stop with it) on its event loop;
requests reach the app there through `httpx.ASGITransport`, so every client is a plain httpx client
(the segmind SDK's included; this Starlette's TestClient is built on the `httpx2` fork).

- `shared_engine(tiny_model)`: the tiny-model engine, loaded once per test session and handed to
  every app (the engine is thread-safe: it locks around generation).
- `running_app(data_dir, engine=..., **settings)`: an `InProcessServer` for the duration of a block;
  `settings` are flat names, e.g. `sync_timeout_seconds=2, webhook_allow_private=True`.
- `InProcessServer`: `http(key)` (an httpx client on the app), `sdk(key)` (the real segmind SDK on
  the app), `log()` (everything logged while it ran), `gather(coroutine function)` (async clients on
  the app's own event loop, for bursts of concurrent requests).
- `serve_on_loopback(app)`: the same app on a real loopback port (uvicorn in a thread), for clients
  that need a URL (a CLI run as a subprocess).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from fluxserve.api import create_app
from fluxserve.config import Settings
from fluxserve.services import Services

from support.promises import wait_until

SLUG = "juggernaut-pro-flux"
BASE_URL = "http://127.0.0.1"  # a loopback name: the host an open server answers

_engines: dict[str, Any] = {}
_engines_lock = threading.Lock()


def shared_engine(tiny_model: Path):
    """The tiny model's engine, loaded once per session (as `fluxserve serve` would load it)."""
    from fluxserve.engine import load_engine

    with _engines_lock:
        key = str(tiny_model)
        if key not in _engines:
            _engines[key] = load_engine(Settings(model=key))
        return _engines[key]


def wait_status(client: httpx.Client, request_id: str, states=("COMPLETED", "FAILED"), timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v2/requests/{request_id}/status").json()
        if body.get("status") in states:
            return body
        time.sleep(0.05)
    raise TimeoutError(f"{request_id} not in {states} after {timeout}s: {body}")


def wait_for(condition: Callable[[], Any], timeout: float = 120.0, what: str = "condition"):
    """`condition()`'s first truthy value, within `timeout` seconds from now."""
    deadline = time.monotonic() + timeout
    return wait_until(condition, lambda: deadline, lambda: f"{what} not met after {timeout}s")


# -- the log of the process ----------------------------------------------------------------------

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class LogCapture(logging.Handler):
    """Every record logged in the process (at INFO and up, as a server logs) while attached, as text:
    the message, any extra fields, and the traceback of an exception."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._lines: list[str] = []
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname} {record.name}: {record.getMessage()}"
            extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
            if extra:
                line += " " + json.dumps(extra, default=str)
            if record.exc_info:
                line += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.stack_info:
                line += "\n" + record.stack_info
        except Exception:  # a log record that cannot be formatted must not break the server
            self.handleError(record)
            return
        with self._lock_lines:
            self._lines.append(line)

    def text(self) -> str:
        with self._lock_lines:
            return "\n".join(self._lines)


@contextmanager
def capturing_logs() -> Iterator[LogCapture]:
    root = logging.getLogger()
    capture = LogCapture()
    level = root.level
    root.addHandler(capture)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


# -- the app -------------------------------------------------------------------------------------


class PortalTransport(httpx.BaseTransport):
    """A sync httpx transport into the app: each request runs through `httpx.ASGITransport` on the
    event loop of the TestClient that runs the app's lifespan (the body is read in full there)."""

    def __init__(self, app, portal) -> None:
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def round_trip():
            response = await self._asgi.handle_async_request(request)
            return response, await response.aread()

        response, body = self._portal.call(round_trip)
        return httpx.Response(response.status_code, headers=response.headers, content=body,
                              extensions=response.extensions)


@dataclass
class InProcessServer:
    client: TestClient
    services: Services
    settings: Settings
    capture: LogCapture
    url: str = BASE_URL

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    @property
    def transport(self) -> httpx.BaseTransport:
        return PortalTransport(self.client.app, self.client.portal)

    def http(self, key: str | None = None, headers: dict[str, str] | None = None) -> httpx.Client:
        """A client on the app (with `x-api-key: key` when a key is given); redirects are not followed."""
        headers = {**({"x-api-key": key} if key else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, transport=self.transport, headers=headers, timeout=60)

    def sdk(self, key: str | None = None, timeout: float = 60):
        """The real segmind SDK, talking to this app."""
        return in_process_sdk(self.transport, api_key=key, base_url=f"{self.url}/v1", timeout=timeout)

    def log(self) -> str:
        return self.capture.text()

    def gather(self, make_coroutine: Callable[[httpx.AsyncClient], Any], **client_options):
        """Run `await make_coroutine(client)` on the app's event loop, with an AsyncClient on the app."""
        app = self.client.app

        async def run():
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url=self.url, **client_options) as client:
                return await make_coroutine(client)

        return self.client.portal.call(run)

    def engine_state(self) -> str:
        with self.http() as http:
            return http.get("/health").json()["engine"]


def in_process_sdk(transport: httpx.BaseTransport, **options):
    """A `segmind.SegmindClient` whose HTTP client sends through `transport` (everything else, the
    SDK's own request building, polling and error handling, is the SDK's)."""
    from segmind import SegmindClient

    class InProcessSegmind(SegmindClient):
        def _build_client(self) -> httpx.Client:
            built = super()._build_client()
            built.close()
            return httpx.Client(headers=built.headers, timeout=built.timeout, base_url=built.base_url,
                                transport=transport)

    return InProcessSegmind(**options)


@contextmanager
def running_app(data_dir: Path, *, engine=None, engine_loader: Callable | None = None, wait_ready: bool = True,
                setup: Callable[[Services], None] | None = None, **settings) -> Iterator[InProcessServer]:
    """The app on `data_dir`, running (lifespan started) for the block.

    The engine: `engine` (handed to the app as it is), or `engine_loader(settings)`, or the package's
    own loader for the configured model. `setup(services)` runs before the app starts."""
    settings = Settings(data_dir=data_dir, **settings)
    if engine is not None:
        engine_loader = lambda _settings: engine  # noqa: E731
    services = Services(settings, **({"engine_loader": engine_loader} if engine_loader else {}))
    if setup is not None:
        setup(services)
    app = create_app(settings, services)
    with (capturing_logs() as capture,
          TestClient(app, base_url=BASE_URL, raise_server_exceptions=False, follow_redirects=False) as client):
        server = InProcessServer(client, services, settings, capture)
        if wait_ready:
            wait_for(lambda: server.engine_state() in ("ready", "failed"), what="the engine")
            if server.engine_state() == "failed":
                raise RuntimeError(f"engine failed to load:\n{server.log()}")
        try:
            yield server
        finally:
            release = getattr(getattr(services.engine, "engine", None), "release_delays", None)
            if release is not None:
                release()  # let a stalled job finish, so the worker drains at once


@contextmanager
def serve_on_loopback(server: InProcessServer) -> Iterator[str]:
    """The running app on a real loopback port as well (uvicorn in a thread; its lifespan is the
    TestClient's, so it is not run twice): the base URL."""
    import uvicorn

    from support.processes import free_port

    config = uvicorn.Config(server.client.app, host="127.0.0.1", port=free_port(), lifespan="off",
                            log_config=None, access_log=False)
    http_server = uvicorn.Server(config)
    thread = threading.Thread(target=http_server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: http_server.started or not thread.is_alive(), timeout=30, what="uvicorn")
    if not http_server.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        http_server.should_exit = True
        thread.join(10)
