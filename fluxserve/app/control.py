"""Control: cancelling jobs, by the client (`POST /v2/requests/{id}/cancel`) or by a per-request deadline.

A cancelled job ends FAILED (the contract has no CANCELLED state) with an `error` that says so. The
store does the transition (`JobStore.cancel`); a worker running the job notices at its next step, when
its progress report is refused. A deadline (`Cancel-After` header or `cancel_after` field: seconds, or a
duration such as `90s`, `5m`, `1h30m`) is enforced three ways, whichever comes first: the worker checks it
when it starts the job and at every step, and the process that accepted the job cancels it on time
even while it waits in the queue (`DeadlineWatcher`).
"""

from __future__ import annotations

import heapq
import logging
import re
import threading
import time

from fluxserve.app.access import Access, Caller
from fluxserve.app.billing import Billing
from fluxserve.app.errors import Conflict, NotFound
from fluxserve.contract import JobState
from fluxserve.jobs import Job, JobStore

log = logging.getLogger(__name__)

CANCELLED_BY_CLIENT = "Request cancelled by the client"
MIN_CANCEL_AFTER_SECONDS = 1.0
MAX_CANCEL_AFTER_SECONDS = 24 * 3600.0

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_cancel_after(value: object) -> float:
    """Seconds from a number or a duration (`30`, `2.5`, `90s`, `5m`, `1h30m`); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("cancel_after must be a number of seconds or a duration such as '90s' or '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.match(text)
            if not match or not any(match.groups()):
                raise ValueError(
                    f"cancel_after {value!r} is not a number of seconds or a duration such as '90s' or '5m'"
                ) from None
            hours, minutes, secs = (float(part or 0) for part in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    else:
        raise ValueError("cancel_after must be a number of seconds or a duration such as '90s' or '5m'")
    if not MIN_CANCEL_AFTER_SECONDS <= seconds <= MAX_CANCEL_AFTER_SECONDS:
        raise ValueError(
            f"cancel_after must be between {MIN_CANCEL_AFTER_SECONDS:g}s and {MAX_CANCEL_AFTER_SECONDS:g}s"
        )
    return seconds


class Control:
    def __init__(self, jobs: JobStore, access: Access, billing: Billing) -> None:
        self.jobs = jobs
        self.access = access
        self.billing = billing

    def cancel(self, caller: Caller, job_id: str) -> Job:
        """Cancel a QUEUED or PROCESSING job (it ends FAILED, its credits released); Conflict once ended,
        a cancelled one included."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"Request {job_id} not found (unknown or expired)")
        self.access.authorize_job(caller, job)
        if not job.state.terminal:
            job = self.jobs.cancel(job_id, CANCELLED_BY_CLIENT) or job
            if job.state is JobState.FAILED and job.error == CANCELLED_BY_CLIENT:
                self.billing.settle(job)  # not charged: released now
                return job
        raise Conflict(f"Request {job_id} already ended ({job.state.value}); there is nothing to cancel")


class DeadlineWatcher:
    """Cancels jobs submitted through this process when their deadline passes (one thread, one heap)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._heap: list[tuple[float, str, str]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def watch(self, job: Job) -> None:
        deadline = job.meta.deadline
        if deadline is None:
            return
        with self._wake:
            heapq.heappush(self._heap, (deadline.at, job.id, deadline.error))
            self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.time()):
                    self._wake.wait(self._heap[0][0] - time.time() if self._heap else None)
                if self._stopping:
                    return
                _, job_id, error = heapq.heappop(self._heap)
            try:
                job = self.store.cancel(job_id, error)  # a job that already ended is left alone
                if job is not None and job.error == error:
                    log.info("job %s cancelled: deadline passed", job_id)
            except Exception:
                log.exception("cancelling job %s at its deadline failed", job_id)
