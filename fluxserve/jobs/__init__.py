"""Jobs: the record that crosses the queue, and the JobStore protocol every backend implements.

A job is typed data: its parameters are the contract's validated request, its metadata says where
its webhook goes, when its deadline falls and what it costs, and its result names its image. The API
submits it; a worker claims it with a lease (a token that identifies this one attempt), renews the
lease while it runs, and completes or fails it. A transition made with a stale token (a worker whose
lease lapsed and whose job was reclaimed) changes nothing.

Backends store a job as JSON-able fields (`job_record` / `job_from_record`), so the typed record
and every store agree field by field.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fluxserve.contract import GenerateRequest, JobState
from fluxserve.jobs.outbox import Delivery


def new_job_id() -> str:
    # uuid4: unguessable, so an id is also the capability to read its result and media.
    return str(uuid.uuid4())


@dataclass(frozen=True)
class WebhookTarget:
    """Where a job's webhook goes, and how its body names the job's URLs."""

    url: str
    base_url: str  # the public base URL the job was submitted through


@dataclass(frozen=True)
class Deadline:
    cancel_after: float  # seconds after submission, as the client asked
    at: float  # the epoch time it falls

    @property
    def error(self) -> str:
        return f"Request cancelled: its deadline ({self.cancel_after:g}s after submission) passed"

    def passed(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.at


@dataclass(frozen=True)
class JobMeta:
    webhook: WebhookTarget | None = None
    deadline: Deadline | None = None
    cost: float = 0.0  # credits reserved for the job (0 when nothing is metered)
    key_id: str | None = None  # the API key that submitted it (its signed media links die with it)

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> JobMeta:
        webhook, deadline = data.get("webhook"), data.get("deadline")
        return cls(
            webhook=WebhookTarget(webhook["url"], webhook["base_url"]) if webhook else None,
            deadline=Deadline(**deadline) if deadline else None,
            cost=data.get("cost", 0.0),
            key_id=data.get("key_id"),
        )


@dataclass(frozen=True)
class JobResult:
    output_key: str  # the image's key in the output store
    media_type: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    id: str
    slug: str
    params: GenerateRequest
    state: JobState = JobState.QUEUED
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    attempts: int = 0
    lease_token: str | None = None
    lease_expires_at: float | None = None
    result: JobResult | None = None  # set once COMPLETED
    error: str | None = None
    # The account that submitted the job (None when auth is off); only it may read the job.
    owner: str | None = None
    meta: JobMeta = field(default_factory=JobMeta)
    # The worker's latest report (step, total, percent, eta_seconds, preview), opaque JSON; cleared
    # when a worker claims the job, kept after it ends.
    progress: dict[str, Any] | None = None


def job_record(job: Job) -> dict[str, Any]:
    """The job as JSON-able fields, one per dataclass field (what a backend writes)."""
    record = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
    record["params"] = job.params.model_dump()
    record["state"] = job.state.value
    record["result"] = dataclasses.asdict(job.result) if job.result else None
    record["meta"] = job.meta.to_record()
    return record


def job_from_record(record: dict[str, Any]) -> Job:
    values = {f.name: record[f.name] for f in dataclasses.fields(Job) if f.name in record}
    # Validated once, at submit: stored parameters are trusted as they are.
    values["params"] = GenerateRequest.model_construct(**record["params"])
    values["state"] = JobState(record["state"])
    values["result"] = JobResult(**record["result"]) if record.get("result") else None
    values["meta"] = JobMeta.from_record(record.get("meta") or {})
    return Job(**values)


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job; every transition it makes is checked against it."""

    job_id: str
    token: str


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
    """The queue. Its rules for tokens, retries and key scopes are `fluxserve.jobs.policy.LeasePolicy`."""

    def submit(
        self, job: Job, *, deliveries: Sequence[Delivery] = (), idempotency: IdempotencyKey | None = None
    ) -> Job:
        """Persist a new QUEUED job (durably, before the client hears its id), with its outbox deliveries,
        in one transaction.

        With `idempotency`: while a live job (not past its retention) holds the same key and owner, create
        nothing and return that job (same fingerprint) or raise IdempotencyConflict (another fingerprint).
        Concurrent submits with one key create exactly one job. The key lives and expires with its job.
        """
        ...

    def find_idempotent(self, idempotency: IdempotencyKey) -> Job | None:
        """The live job holding this key and owner (IdempotencyConflict when its request had another
        fingerprint), or None: a replay is answered from it before any admission."""
        ...

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or past its retention window."""
        ...

    def queue_position(self, job_id: str) -> int | None:
        """How many QUEUED jobs of the same slug are ahead of this one (0 = next); None unless QUEUED."""
        ...

    def claim(
        self, worker_id: str, slugs: list[str] | None = None, *, token: str | None = None
    ) -> tuple[Job, Lease] | None:
        """Take the oldest runnable job (QUEUED, or PROCESSING whose lease lapsed at least
        `policy.reclaim_delay(attempts)` ago) and lease it under `token` (default: a new
        `policy.new_token(worker_id)`). Safe to retry: when a job is already leased under `token`
        (the first call ran but its reply was lost), return that job, with no second lease and no
        attempt burned. A lapsed job that already had `max_attempts` claims ends FAILED instead."""
        ...

    def wait_for_work(self, slugs: list[str] | None, timeout: float) -> None:
        """Block until a job of these slugs (None: any) may have been submitted, or `timeout` passes:
        an idle worker waits here instead of polling."""
        ...

    def heartbeat(self, lease: Lease) -> bool:
        """Extend the lease; False when the lease is no longer ours (stop working on the job)."""
        ...

    def complete(self, lease: Lease, result: JobResult) -> bool:
        """PROCESSING → COMPLETED; False (and no change) when the lease is stale. Safe to retry: True
        again when the job already ended COMPLETED under this lease."""
        ...

    def fail(self, lease: Lease, error: str) -> bool:
        """PROCESSING → FAILED; False (and no change) when the lease is stale. Safe to retry: True
        again when the job already ended FAILED under this lease."""
        ...

    def report_progress(self, lease: Lease, progress: dict[str, Any]) -> bool:
        """Replace the job's `progress` while PROCESSING under this lease; False (and no change) when the
        lease is stale or the job was cancelled: the worker should stop."""
        ...

    def watch_previews(self, job_id: str, seconds: float) -> None:
        """Someone is watching this job's previews for the next `seconds` (a client following it with
        `?preview=true`): a marker that a repeated call renews, which lapses on its own. No error for an
        unknown or ended job (the marker goes when it lapses, or with its job's purge). Workers make latent
        previews only while it is live (`previews_watched`)."""
        ...

    def previews_watched(self, job_id: str) -> bool:
        """Whether a `watch_previews` marker for the job is live now."""
        ...

    def cancel(self, job_id: str, error: str) -> Job | None:
        """QUEUED or PROCESSING → FAILED with `error` (and the lease revoked, so the worker's next
        `report_progress` answers False); a terminal job is left as it is. Returns the job's record after
        the call, or None when unknown."""
        ...

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is COMPLETED or FAILED or `timeout` passes; return its latest record."""
        ...

    def expired(self, limit: int = 500) -> list[Job]:
        """Up to `limit` ended jobs past their retention window, still stored: the janitor deletes their
        media first, then purges them, so a purge whose reply was lost loses no media to delete."""
        ...

    def purge_expired(self, job_ids: Sequence[str] | None = None) -> list[Job]:
        """Delete the jobs past their retention window (only those of `job_ids`, when given) with their
        deliveries, idempotency keys and preview markers, and return those this call deleted (a re-run
        finds them gone; their media are the caller's to delete, see `expired`)."""
        ...

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (ended ones until they expire), for metrics."""
        ...

    def ping(self) -> bool:
        """True when the store answers."""
        ...

    def close(self) -> None: ...
