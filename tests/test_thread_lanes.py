"""The API's thread lanes (api/deps.ThreadLane): the one hop a route makes into blocking store code."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from fluxserve.api.deps import ThreadLane
from fluxserve.app.errors import Unavailable

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_a_call_runs_on_a_lane_thread_with_the_callers_context():
    lane = ThreadLane("test-lane", threads=2)

    async def main() -> tuple[str, str]:
        REQUEST_ID.set("req-1")  # as the request's log fields are set before its hop
        return await lane.run(lambda: (threading.current_thread().name, REQUEST_ID.get()))

    try:
        thread, request_id = asyncio.run(main())
    finally:
        lane.close()
    assert thread.startswith("test-lane") and request_id == "req-1"


def test_a_call_that_gets_no_thread_in_time_is_unavailable_and_the_lane_recovers():
    lane = ThreadLane("test-lane", threads=1, queue_seconds=0.2)
    release = threading.Event()

    async def main() -> tuple[float, str]:
        holder = asyncio.create_task(lane.run(release.wait, 10))
        await asyncio.sleep(0.05)  # the one thread is taken
        started = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            await lane.run(lambda: "never")
        waited = time.monotonic() - started
        assert refused.value.retry_after == 2
        release.set()
        assert await holder is True
        return waited, await lane.run(lambda: "after")

    try:
        waited, after = asyncio.run(main())
    finally:
        release.set()
        lane.close()
    assert 0.15 <= waited < 2.0 and after == "after"


def test_a_cancelled_wait_keeps_its_thread_until_the_call_ends():
    """A request cancelled mid-call (its client went away) does not hand its thread to the next call
    while the store call still runs: the lane's bound holds."""
    lane = ThreadLane("test-lane", threads=1, queue_seconds=0.2)
    release, finished = threading.Event(), threading.Event()

    def store_call() -> None:
        release.wait(10)
        finished.set()

    async def main() -> None:
        first = asyncio.create_task(lane.run(store_call))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(Unavailable):  # the thread is still busy with the cancelled request's call
            await lane.run(lambda: "too soon")
        release.set()
        await asyncio.sleep(0.1)
        assert finished.is_set()  # the call ran to its end
        assert await lane.run(lambda: "next") == "next"

    try:
        asyncio.run(main())
    finally:
        release.set()
        lane.close()
