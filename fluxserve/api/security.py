"""What keeps a browser from being turned against the server, above all one without API keys on a
developer's machine (the default `make run`): any page its user visits can make the browser send
requests here.

- Cross-site "simple" requests: a page may POST a `text/plain` or form body to any address without
  asking (no CORS preflight) and start jobs, spending an open server's GPU. Bodies must be declared
  `application/json` (415 otherwise), which no page can send cross-site without a preflight, and the
  preflight fails while CORS is off (the default; `CORS_ORIGINS` names the origins to let in).
- DNS rebinding: a page on evil.example whose name is re-pointed at 127.0.0.1 becomes same-origin with
  this server and could read its answers. Its requests still carry `Host: evil.example`, so an open
  server answers only the names it is known by (421 otherwise). With keys enforced, a rebound page
  has no key, so any host is answered unless `ALLOWED_HOSTS` says otherwise.
- Every response carries a Content-Security-Policy without inline script, and refuses framing.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.config import Settings
from fluxserve.contract import error_body

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_RAW_SECURITY_HEADERS = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# The headers a browser page may send cross-site once its origin is allowed.
CORS_HEADERS = ["Content-Type", "X-Api-Key", "Authorization", "Idempotency-Key", "Cancel-After", "X-Request-Id"]
CORS_EXPOSED = ["X-Request-Id", "X-Seed", "Retry-After"]


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (a route may set its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in _RAW_SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class JsonBodiesOnly:
    """ASGI middleware: a request with a body must declare it `application/json` (415 otherwise)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            has_body = headers.get(b"content-length", b"0").strip() != b"0" or b"transfer-encoding" in headers
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if has_body and media_type != b"application/json":
                message = "Unsupported Content-Type: send the body as application/json"
                await JSONResponse(error_body(message), 415)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def split_host(value: str) -> tuple[str, str | None]:
    """A `Host` header (or an allowed-hosts entry) as (lower-case name, port or None); an IPv6
    literal keeps its brackets, as in a Host header."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value.partition("]")
        return (name + bracket, rest[1:] if rest.startswith(":") else None)
    name, colon, port = value.partition(":")
    return name, port if colon else None


class HostPolicy:
    """Which `Host` headers this server answers."""

    def __init__(self, settings: Settings, keys_enforced: Callable[[], bool]) -> None:
        configured = [entry for entry in settings.api.allowed_hosts.split(",") if entry.strip()]
        self.any_host = "*" in (entry.strip() for entry in configured)
        self.configured = [split_host(entry) for entry in configured]
        bind = f"[{settings.host}]" if ":" in settings.host else settings.host
        public = urlsplit(settings.public_url).hostname if settings.public_url else None
        public = f"[{public}]" if public and ":" in public else public
        self.defaults = {split_host(name)[0] for name in (bind, *LOOPBACK_NAMES, public) if name}
        self.keys_enforced = keys_enforced

    def _listed(self, name: str, port: str | None) -> bool:
        return any(name == entry and entry_port in (None, port) for entry, entry_port in self.configured)

    async def allows(self, host: str) -> bool:
        if self.any_host:
            return True
        name, port = split_host(host)
        if self.configured:
            return self._listed(name, port)
        if name in self.defaults:
            return True
        # May read the key store (until a key is seen): off the event loop.
        return await anyio.to_thread.run_sync(self.keys_enforced)


class HostCheck:
    """ASGI middleware: 421 for a `Host` header the policy does not allow. A request without one
    passes: browsers always send it, and only browsers are the threat here."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            if host is not None and not await self.policy.allows(host.decode("latin-1")):
                message = "Misdirected request: this server does not answer to that host name (FLUXSERVE_ALLOWED_HOSTS)"
                await JSONResponse(error_body(message), 421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def cors_origins(settings: Settings) -> list[str]:
    return [origin.strip() for origin in settings.api.cors_origins.split(",") if origin.strip()]
