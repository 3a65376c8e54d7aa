"""A Python client for a fluxserve server: the hosted Segmind SDK's surface, plus live progress.

    from fluxserve.client import Client

    client = Client("http://127.0.0.1:8000")
    result = client.run("juggernaut-pro-flux", positivePrompt="a fox in snow", on_progress=print)
    image = client.run_sync("juggernaut-pro-flux", positivePrompt="a fox in snow").content
    handle = client.submit_async("juggernaut-pro-flux", positivePrompt="a fox", idempotency_key="fox-1")
    result = handle.wait(timeout=600, on_progress=lambda p: print(p.percent))

`run`, `run_sync`, `submit_async` and the handle's `wait` behave as the `segmind` package's do (same
errors: a FAILED request raises InferenceFailed, a deadline InferenceTimeout). With `on_progress`,
`wait` follows the request's Server-Sent Events instead of polling and calls back with a `Progress`
on every change (queue position, step / total, percent, ETA).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_WAIT_TIMEOUT = 600.0
DEFAULT_POLL_INTERVAL = 1.0
# The server sends a keep-alive at least every 15 s, so a silent stream for this long is broken.
EVENTS_READ_TIMEOUT = 45.0


class FluxserveError(Exception):
    def __init__(self, status: int | None, detail: str | None) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


class InferenceFailed(FluxserveError):
    """The request ended FAILED (a cancel included); `detail` is its error."""

    def __init__(self, detail: str | None, status_body: dict[str, Any]) -> None:
        super().__init__(422, detail)
        self.status_body = status_body


class InferenceTimeout(FluxserveError):
    def __init__(self, request_id: str, elapsed: float) -> None:
        super().__init__(None, f"request {request_id} did not finish within {elapsed:.0f}s")
        self.request_id = request_id
        self.elapsed = elapsed


@dataclass(frozen=True)
class Progress:
    request_id: str
    status: str
    queue_position: int | None = None
    step: int | None = None
    total: int | None = None
    percent: float | None = None
    eta_seconds: float | None = None
    preview: str | None = None  # a JPEG data URL of the current latent, when asked for

    @classmethod
    def from_status(cls, body: dict[str, Any]) -> Progress:
        progress = body.get("progress") or {}
        return cls(
            request_id=body["request_id"],
            status=body["status"],
            queue_position=body.get("queue_position"),
            step=progress.get("step"),
            total=progress.get("total"),
            percent=progress.get("percent"),
            eta_seconds=progress.get("eta_seconds"),
            preview=progress.get("preview"),
        )


ProgressCallback = Callable[[Progress], None]


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("error")
    except ValueError:
        detail = response.text[:200] or None
    raise FluxserveError(response.status_code, detail)


def _terminal_body(response: httpx.Response) -> dict[str, Any]:
    """A status or result body; FAILED arrives as 422 and is a body, not an error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("status") in ("COMPLETED", "FAILED"):
        return body
    _raise_for_error(response)
    return body


def parse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, decoded data) pairs from the lines of a text/event-stream."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class RequestHandle:
    """A submitted request (what `submit_async` returns)."""

    def __init__(self, client: Client, body: dict[str, Any]) -> None:
        self._client = client
        self.request_id: str = body["request_id"]
        self.status_url: str = body["status_url"]
        self.response_url: str = body["response_url"]
        self.submit_response = body

    def status(self) -> dict[str, Any]:
        return _terminal_body(self._client.http.get(self.status_url))

    def result(self) -> dict[str, Any]:
        return _terminal_body(self._client.http.get(self.response_url))

    def cancel(self) -> dict[str, Any]:
        response = self._client.http.post(f"/v2/requests/{self.request_id}/cancel")
        _raise_for_error(response)
        return response.json()

    def events(
        self, *, preview: bool = False, timeout: float | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The request's Server-Sent Events until it ends: ("status", body)…, then ("completed" or
        "failed", body)."""
        read_timeout = EVENTS_READ_TIMEOUT if timeout is None else min(timeout, EVENTS_READ_TIMEOUT)
        with self._client.http.stream(
            "GET",
            f"/v2/requests/{self.request_id}/events",
            params={"preview": "true"} if preview else None,
            timeout=httpx.Timeout(self._client.timeout, read=read_timeout),
        ) as response:
            if not response.is_success:
                response.read()
                _raise_for_error(response)
            yield from parse_events(response.iter_lines())

    def wait(
        self,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        interval: float = DEFAULT_POLL_INTERVAL,
        on_progress: ProgressCallback | None = None,
        preview: bool = False,
    ) -> dict[str, Any]:
        """Block until the request ends: its result body (COMPLETED), or InferenceFailed, InferenceTimeout."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if on_progress is None:
                status = self.status()
                if status["status"] in ("COMPLETED", "FAILED"):
                    return self._finish(status)
                time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
                continue
            try:
                for name, body in self.events(preview=preview, timeout=deadline - time.monotonic()):
                    if name == "status":
                        on_progress(Progress.from_status(body))
                    elif name in ("completed", "failed"):
                        return self._finish(body)
                    if time.monotonic() >= deadline:
                        break
            except httpx.TransportError:
                time.sleep(min(interval, max(0.0, deadline - time.monotonic())))  # reconnect
        raise InferenceTimeout(self.request_id, time.monotonic() - started)

    def _finish(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["status"] == "FAILED":
            raise InferenceFailed(body.get("error"), body)
        return body if "output" in body else self.result()


class Client:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0
    ) -> None:
        base = base_url.rstrip("/")
        for suffix in ("/v1", "/v2"):
            base = base.removesuffix(suffix)
        self.base_url = base
        self.timeout = timeout
        headers = {"User-Agent": "fluxserve-client"}
        if api_key:
            headers["x-api-key"] = api_key
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any]:
        response = self.http.get("/health")
        _raise_for_error(response)
        return response.json()

    def run(self, slug: str, on_progress: ProgressCallback | None = None, **params) -> dict[str, Any]:
        """Submit (v2) and wait: the result body of the COMPLETED request."""
        return self.submit_async(slug, **params).wait(on_progress=on_progress)

    def run_sync(self, slug: str, **params) -> httpx.Response:
        """One blocking v1 call: the response carries the image bytes (`.content`)."""
        response = self.http.post(f"/v1/{slug}", json=params, timeout=httpx.Timeout(self.timeout, read=None))
        _raise_for_error(response)
        return response

    def submit_async(
        self,
        slug: str,
        *,
        idempotency_key: str | None = None,
        cancel_after: float | str | None = None,
        **params,
    ) -> RequestHandle:
        """Queue a request (v2). `webhook` and `webhook_events_filter` go in `params`, as on the wire."""
        headers = {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if cancel_after is not None:
            headers["Cancel-After"] = str(cancel_after)
        response = self.http.post(f"/v2/{slug}", json=params, headers=headers)
        _raise_for_error(response)
        return RequestHandle(self, response.json())

    def download(self, url: str) -> bytes:
        response = self.http.get(url)
        _raise_for_error(response)
        return response.content
