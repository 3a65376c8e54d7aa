"""Jobs: the record that crosses the queue, and the JobStore protocol every backend implements.

A job is plain data. The API submits it; a worker claims it with a lease (a token that identifies
this one attempt), renews the lease while it runs, and completes or fails it. A transition made with
a stale token (a worker whose lease lapsed and whose job was reclaimed) changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
    # The worker's latest report (step, total, percent, eta_seconds, preview), opaque JSON; cleared
    # when a worker claims the job, kept after it ends.
    progress: dict[str, Any] | None = None


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job; every transition it makes is checked against it."""

    job_id: str
    token: str


# -- outbox and idempotency records (webhooks, Idempotency-Key) ------------------------------------

DeliveryTrigger = Literal["started", "finished"]
DeliveryState = Literal["pending", "delivered", "failed"]


@dataclass
class Delivery:
    """One message in the durable outbox: a POST owed to `url` once its job reaches `trigger`.

    `trigger` "started" is due once the job has been claimed (started_at set); "finished" once it is
    COMPLETED or FAILED, whichever way it got there. The record is created with its job (in `submit`)
    and deleted with it (in `purge_expired`).
    """

    id: str  # the message id (Standard Webhooks `webhook-id`), the same on every retry
    job_id: str
    url: str
    trigger: DeliveryTrigger = "finished"
    state: DeliveryState = "pending"
    attempts: list[dict[str, Any]] = field(default_factory=list)
    next_attempt_at: float = 0.0  # not before this time (0: as soon as the trigger holds)


def new_delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's Idempotency-Key, scoped to its owner, with a fingerprint of the request it came with."""

    key: str
    fingerprint: str
    owner: str | None = None


class IdempotencyConflict(Exception):
    """The key is held by a live job whose request had another fingerprint."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class JobStore(Protocol):
    def submit(
        self, job: Job, *, deliveries: Sequence[Delivery] = (), idempotency: IdempotencyKey | None = None
    ) -> Job:
        """Persist a new QUEUED job (durably, before the client hears its id), with its outbox deliveries,
        in one transaction.

        With `idempotency`: while a live job (not past its retention) holds the same key and owner, create
        nothing and return that job (same fingerprint) or raise IdempotencyConflict (another fingerprint).
        Concurrent submits with one key create exactly one job. The key lives and expires with its job.
        """

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

    def report_progress(self, lease: Lease, progress: dict[str, Any]) -> bool:
        """Replace the job's `progress` while PROCESSING under this lease; False (and no change) when the
        lease is stale or the job was cancelled: the worker should stop."""

    def cancel(self, job_id: str, error: str) -> Job | None:
        """QUEUED or PROCESSING → FAILED with `error` (and the lease revoked, so the worker's next
        `report_progress` answers False); a terminal job is left as it is. Returns the job's record after
        the call, or None when unknown."""

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is COMPLETED or FAILED or `timeout` passes; return its latest record."""

    def purge_expired(self) -> list[Job]:
        """Delete jobs past their retention window (with their deliveries and idempotency keys) and
        return them (their media goes too)."""

    def claim_delivery(self, worker_id: str) -> tuple[Delivery, Lease] | None:
        """Lease the due pending delivery (trigger holds, `next_attempt_at` passed, no live lease) that is
        due first; the lease lasts as long as a job's, and its `job_id` field names the delivery."""

    def record_attempt(
        self, lease: Lease, attempt: dict[str, Any], state: DeliveryState, next_attempt_at: float = 0.0
    ) -> bool:
        """Append `attempt` to the leased delivery, set its `state` (and `next_attempt_at` when it stays
        pending) and release the lease; False (and no change) when the lease is stale."""

    def deliveries(self, job_id: str) -> list[Delivery]:
        """The job's deliveries, oldest first."""

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (ended ones until they expire), for metrics."""

    def ping(self) -> bool:
        """True when the store answers."""

    def close(self) -> None: ...
