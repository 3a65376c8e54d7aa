"""What routes are handed (FastAPI dependencies): the process's services and the caller, plus the
HTTP details they share: public URLs, bounded body reading, the failed-job answer."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from fluxserve.app.access import Caller
from fluxserve.app.errors import InvalidRequest, Unavailable
from fluxserve.jobs import Job
from fluxserve.services import Services
from fluxserve.views import failed_body

T = TypeVar("T")

# Threads for store writes (submits, cancels), apart from those reads and /ready use.
WRITE_THREADS = 16
# How long a write may wait for one of them before it is answered 503.
WRITE_QUEUE_SECONDS = 10.0
# Threads for the status reads clients poll.
READ_THREADS = 32


class ThreadLane:
    """Blocking store calls on threads of their own, so a store slow to write (a held SQLite write lock,
    a Redis failing over) ties up its lane only, while status reads and `/ready` keep theirs. With
    `queue_seconds`, a call that gets no thread within it is answered 503 with Retry-After.

    Entered with one lean hop (the event loop's executor, the caller's context copied as anyio does):
    anyio's to_thread adds a cancel scope and two capacity limiters to every call, about 30 % more CPU
    a hop (measured: 280–340 µs against 180–245 µs on a 2-core VM)."""

    def __init__(self, name: str, threads: int, queue_seconds: float | None = None) -> None:
        self.threads = threads
        self.queue_seconds = queue_seconds
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._free: asyncio.Semaphore | None = None

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        if self._free is None:  # made on the app's event loop
            self._free = asyncio.Semaphore(self.threads)
        free = self._free
        if not free.locked():
            await free.acquire()  # a thread is free: no wait, no timer
        elif self.queue_seconds is None:
            await free.acquire()
        else:
            try:
                await asyncio.wait_for(free.acquire(), self.queue_seconds)
            except TimeoutError:
                raise Unavailable("The job store is busy writing; try again shortly", retry_after=2) from None
        context = contextvars.copy_context()  # the request's log fields, in the thread's log lines
        future = asyncio.get_running_loop().run_in_executor(self._executor, context.run, func, *args)
        # The thread is given back when the call ends, not when a cancelled wait does: once started, the
        # call runs to its end (a cancelled request must not hide a stored job).
        future.add_done_callback(lambda _: free.release())
        return await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def thread_lanes() -> dict[str, ThreadLane]:
    """The app's lanes, by their name in `app.state`."""
    return {"writes": ThreadLane("store-write", WRITE_THREADS, WRITE_QUEUE_SECONDS),
            "reads": ThreadLane("store-read", READ_THREADS)}


def write_lane(request: Request) -> ThreadLane:
    lane: ThreadLane = request.app.state.writes
    return lane


def read_lane(request: Request) -> ThreadLane:
    lane: ThreadLane = request.app.state.reads
    return lane


def services_in(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def services_of(request: Request) -> Services:
    # `async` on purpose: FastAPI runs a plain `def` dependency on a worker thread, a hop that costs
    # more CPU than the rest of a small request.
    return services_in(request)


ServicesDep = Annotated[Services, Depends(services_of)]


def presented_key(request: Request) -> str | None:
    """The API key as the segmind SDK sends it (`x-api-key`) or as `Authorization: Bearer`."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def current_caller(request: Request, services: ServicesDep) -> Caller:
    """The authenticated caller (401 when keys are enforced and none valid is presented)."""
    # A thread hop costs more CPU than the rest of a small request: skipped when the store has no say.
    known = services.access.caller_known_without_store()
    if known is not None:
        return known
    return await anyio.to_thread.run_sync(services.access.authenticate, presented_key(request))


CallerDep = Annotated[Caller, Depends(current_caller)]


def caller_on_thread(request: Request, services: Services) -> Callable[[], Caller]:
    """`current_caller` for a route that hops to a thread anyway: the store lookup runs there, inside the
    route's own hop, instead of costing a hop of its own."""
    known = services.access.caller_known_without_store()
    if known is not None:
        return lambda: known
    key = presented_key(request)
    return lambda: services.access.authenticate(key)


def base_url(request: Request, services: Services) -> str:
    return (services.settings.public_url or str(request.base_url)).rstrip("/")


def job_urls(base: str, job_id: str) -> dict[str, str]:
    # Absolute: clients (the segmind SDK among them) GET these exactly as given.
    status_url = f"{base}/v2/requests/{job_id}/status"
    return {"status_url": status_url, "poll_url": status_url, "response_url": f"{base}/v2/requests/{job_id}"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (400) beyond `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"Request body too large (limit {limit} bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InvalidRequest(f"Request body too large (limit {limit} bytes)")
    return bytes(body)


def failed_response(job: Job, **extra: Any) -> JSONResponse:
    """A FAILED job's answer: 422 with its error, as the hosted API does."""
    return JSONResponse({**failed_body(job), **extra}, status_code=422)
