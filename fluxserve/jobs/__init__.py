"""Jobs: the record that crosses the queue, and the JobStore protocol every backend implements.

A job is plain data. The API submits it; a worker claims it with a lease (a token that identifies
this one attempt), renews the lease while it runs, and completes or fails it. A transition made with
a stale token (a worker whose lease lapsed and whose job was reclaimed) changes nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from fluxserve.contract import JobState


def new_job_id() -> str:
    # uuid4: unguessable, so an id is also the capability to read its result and media.
    return str(uuid.uuid4())


@dataclass
class Job:
    id: str
    slug: str
    params: dict[str, Any]
    state: JobState = JobState.QUEUED
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    attempts: int = 0
    lease_token: str | None = None
    lease_expires_at: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # The account that submitted the job (None when auth is off); only it may read the job.
    owner: str | None = None
    # Per-feature data that travels with the job (a backend stores it as one opaque JSON value).
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job; every transition it makes is checked against it."""

    job_id: str
    token: str


class JobStore(Protocol):
    def submit(self, job: Job) -> Job:
        """Persist a new QUEUED job (durably, before the client hears its id)."""

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or past its retention window."""

    def queue_position(self, job_id: str) -> int | None:
        """How many QUEUED jobs of the same slug are ahead of this one (0 = next); None unless QUEUED."""

    def claim(self, worker_id: str, slugs: list[str] | None = None) -> tuple[Job, Lease] | None:
        """Take the oldest runnable job (QUEUED, or PROCESSING with a lapsed lease) and lease it."""

    def heartbeat(self, lease: Lease) -> bool:
        """Extend the lease; False when the lease is no longer ours (stop working on the job)."""

    def complete(self, lease: Lease, result: dict[str, Any]) -> bool:
        """PROCESSING → COMPLETED; False (and no change) when the lease is stale."""

    def fail(self, lease: Lease, error: str) -> bool:
        """PROCESSING → FAILED; False (and no change) when the lease is stale."""

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is COMPLETED or FAILED or `timeout` passes; return its latest record."""

    def purge_expired(self) -> list[Job]:
        """Delete jobs past their retention window and return them (their media goes too)."""

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (ended ones until they expire), for metrics."""

    def ping(self) -> bool:
        """True when the store answers."""

    def close(self) -> None: ...
