"""The fleet JobStore and Outbox on Redis: API replicas and workers on many hosts share one queue.

Each transition is one Lua script (see `redis_scripts` for them and for the key layout), so it is
atomic on the server: two claimers never lease the same job, and a heartbeat or a result carrying a
stale lease token changes nothing. A job's record (and a webhook delivery's) is a hash with one JSON
value per dataclass field (`job_record`), so fields added to Job travel without changes here.

Waiting for a job to end does not poll: the script that ends a job publishes its id, and one pub/sub
connection per store wakes the threads waiting on it.

The client re-sends a command whose reply was lost (a reset connection, a read timeout), after Redis
may already have run it; every script answers such a repeat as it answered the first run (see
`redis_scripts`). `from_url` sizes the client's timeouts and retries from the lease
(`ClientTimeouts`): one call, its re-sends included, fits in a third of the lease.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from fluxserve.contract import JobState
from fluxserve.jobs import (
    IdempotencyConflict,
    IdempotencyKey,
    Job,
    JobResult,
    Lease,
    job_from_record,
    job_record,
)
from fluxserve.jobs import redis_scripts as scripts
from fluxserve.jobs.outbox import Delivery, DeliveryLease, DeliveryState
from fluxserve.jobs.policy import LeasePolicy, idempotency_scope

log = logging.getLogger(__name__)

# A waiter re-reads the record this often even without a message: a safety net for a message missed
# while the pub/sub connection was being re-established, not the way waiters normally wake.
_RECHECK_SECONDS = 5.0
_PURGE_BATCH = 500
_ANY = "*"  # a waiter for any published key
_HEALTH_CHECK_SECONDS = 15


@dataclass(frozen=True)
class ClientTimeouts:
    """The client's socket timeouts and re-sends for one lease: a call that meets lost replies (each
    costs at most `socket` seconds, then a pause of at most `backoff_cap`) is answered or fails within
    `worst_case` seconds: a third of the lease, for a lease of 6 s or more (a try waits `MIN_SOCKET`
    at least, so a shorter lease gets a little more; and `MAX_SOCKET` at most, whatever the lease)."""

    socket: float
    retries: int
    backoff_cap: float

    RETRIES = 5  # a lost reply costs little (a reset is seen at once): six tries ride out a burst of them
    MIN_SOCKET = 0.25
    MAX_SOCKET = 5.0

    @classmethod
    def for_lease(cls, lease_seconds: float) -> ClientTimeouts:
        budget = lease_seconds / 3
        cap = min(0.25, budget / 40)
        socket = min(cls.MAX_SOCKET, max(cls.MIN_SOCKET, (budget - cls.RETRIES * cap) / (cls.RETRIES + 1)))
        return cls(socket=socket, retries=cls.RETRIES, backoff_cap=cap)

    @property
    def worst_case(self) -> float:
        return (self.retries + 1) * self.socket + self.retries * self.backoff_cap


def lease_bound_client(url: str, lease_seconds: float) -> redis.Redis:
    """A client (`decode_responses`) whose calls, re-sends included, fit in a third of the lease: a
    heartbeat that met a lost reply still renews the lease before it lapses."""
    timeouts = ClientTimeouts.for_lease(lease_seconds)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeouts.socket,
        socket_timeout=timeouts.socket,
        health_check_interval=_HEALTH_CHECK_SECONDS,
        retry=Retry(ExponentialBackoff(cap=timeouts.backoff_cap, base=min(0.01, timeouts.backoff_cap)),
                    retries=timeouts.retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def active_key(prefix: str, slug: str) -> str:
    """The sorted set of one model's QUEUED and PROCESSING jobs (see `redis_scripts`): its ZCARD is the
    work waiting for or held by that model's workers, what an autoscaler sizes them on (deploy/helm's
    KEDA `redis` triggers name these keys)."""
    return f"{prefix}:active:{slug}"


class RedisJobStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "fluxserve", policy: LeasePolicy | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.policy = policy or LeasePolicy()
        self._scripts = {
            name: client.register_script(scripts.PRELUDE + getattr(scripts, name))
            for name in ("SUBMIT", "FIND_IDEMPOTENT", "GET", "POSITION", "CLAIM", "HEARTBEAT", "FINISH",
                         "EXPIRED", "PURGE_EXPIRED", "COUNT_BY_STATE", "REPORT_PROGRESS", "CANCEL", "CLAIM_DELIVERY",
                         "RECORD_ATTEMPT", "DELIVERIES")
        }
        self._delays = json.dumps(_reclaim_delays(self.policy))
        self._ended = _Wakeups(client, f"{prefix}:ended")  # a job's id when it ends
        self._queued = _Wakeups(client, f"{prefix}:queued")  # a job's slug when it is submitted

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "fluxserve", policy: LeasePolicy | None = None) -> RedisJobStore:
        policy = policy or LeasePolicy()
        return cls(lease_bound_client(url, policy.lease_seconds), prefix=prefix, policy=policy)

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](args=[self.prefix, *args])

    def outbox(self) -> RedisOutbox:
        return RedisOutbox(self)

    # -- the protocol --------------------------------------------------------------------------

    def submit(
        self, job: Job, *, deliveries: Sequence[Delivery] = (), idempotency: IdempotencyKey | None = None
    ) -> Job:
        job.state = JobState.QUEUED
        scope = idempotency_scope(idempotency) if idempotency else ""
        outbox = [[d.id, _flat(_delivery_record(dataclasses.replace(d, job_id=job.id)))] for d in deliveries]
        answer, value = self._run(
            "SUBMIT", job.id, job.slug, repr(job.created_at) if job.created_at else "", scope,
            idempotency.fingerprint if idempotency else "", json.dumps(outbox), *_flat(job_record(job)),
        )
        if answer == "conflict":
            raise IdempotencyConflict(value)
        if answer == "existing":
            return _decode_job(value)
        job.created_at = float(value)
        return job

    def find_idempotent(self, idempotency: IdempotencyKey) -> Job | None:
        answer = self._run("FIND_IDEMPOTENT", idempotency_scope(idempotency), idempotency.fingerprint)
        if not answer:
            return None
        if answer[0] == "conflict":
            raise IdempotencyConflict(answer[1])
        return _decode_job(answer[1])

    def get(self, job_id: str) -> Job | None:
        record = self._run("GET", job_id)
        return _decode_job(record) if record else None

    def queue_position(self, job_id: str) -> int | None:
        return self._run("POSITION", job_id)

    def claim(
        self, worker_id: str, slugs: list[str] | None = None, *, token: str | None = None
    ) -> tuple[Job, Lease] | None:
        # Made once per call: when the client re-sends the script, the repeat finds the lease it took.
        token = token if token is not None else self.policy.new_token(worker_id)
        policy = self.policy
        record = self._run("CLAIM", json.dumps(token), policy.lease_seconds, policy.max_attempts,
                           policy.retention_seconds, json.dumps(policy.exhausted_error), self._delays,
                           *(slugs or []))
        if not record:
            return None
        job = _decode_job(record)
        return job, Lease(job.id, token)

    def heartbeat(self, lease: Lease) -> bool:
        return self._run("HEARTBEAT", lease.job_id, json.dumps(lease.token), self.policy.lease_seconds,
                         self._delays) == 1

    def complete(self, lease: Lease, result: JobResult) -> bool:
        return self._finish(lease, JobState.COMPLETED, result=dataclasses.asdict(result), error=None)

    def fail(self, lease: Lease, error: str) -> bool:
        return self._finish(lease, JobState.FAILED, result=None, error=error)

    def _finish(self, lease: Lease, state: JobState, *, result: dict[str, Any] | None, error: str | None) -> bool:
        return self._run("FINISH", lease.job_id, json.dumps(lease.token), state.value, json.dumps(result),
                         json.dumps(error), self.policy.retention_seconds) == 1

    def report_progress(self, lease: Lease, progress: dict[str, Any]) -> bool:
        return self._run("REPORT_PROGRESS", lease.job_id, json.dumps(lease.token), json.dumps(progress)) == 1

    def watch_previews(self, job_id: str, seconds: float) -> None:
        # A key that lapses on its own (server clock): a watcher that goes away leaves nothing behind.
        self.client.set(self._watchers_key(job_id), 1, px=max(1, round(seconds * 1000)))

    def previews_watched(self, job_id: str) -> bool:
        return bool(self.client.exists(self._watchers_key(job_id)))

    def _watchers_key(self, job_id: str) -> str:
        """P:preview-watch:<id>: a string, live while someone follows the job's previews."""
        return f"{self.prefix}:preview-watch:{job_id}"

    def cancel(self, job_id: str, error: str) -> Job | None:
        record = self._run("CANCEL", job_id, json.dumps(error), self.policy.retention_seconds)
        return _decode_job(record) if record else None

    def wait_terminal(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        with self._ended.watch(job_id) as ended:
            while True:
                job = self.get(job_id)
                remaining = deadline - time.monotonic()
                if job is None or job.state.terminal or remaining <= 0:
                    return job
                ended.wait(min(remaining, _RECHECK_SECONDS))
                ended.clear()

    def wait_for_work(self, slugs: list[str] | None, timeout: float) -> None:
        with self._queued.watch(*(slugs or [_ANY])) as queued:
            queued.wait(timeout)

    def expired(self, limit: int = _PURGE_BATCH) -> list[Job]:
        return [_decode_job(record) for record in self._run("EXPIRED", limit)]

    def purge_expired(self, job_ids: Sequence[str] | None = None) -> list[Job]:
        purged: list[Job] = []
        if job_ids is not None:
            ids = list(job_ids)
            purged = [_decode_job(record) for start in range(0, len(ids), _PURGE_BATCH)
                      for record in self._run("PURGE_EXPIRED", _PURGE_BATCH, *ids[start:start + _PURGE_BATCH])]
        else:
            while True:
                batch = self._run("PURGE_EXPIRED", _PURGE_BATCH)
                purged += [_decode_job(record) for record in batch]
                if len(batch) < _PURGE_BATCH:
                    break
        # A purged job's preview markers go now; one that cannot be deleted lapses on its own soon.
        try:
            for start in range(0, len(purged), _PURGE_BATCH):
                self.client.delete(*(self._watchers_key(job.id) for job in purged[start:start + _PURGE_BATCH]))
        except redis.RedisError as exc:
            log.debug("preview markers of purged jobs left to lapse (%s: %s)", type(exc).__name__, exc)
        return purged

    def count_by_state(self) -> dict[str, int]:
        flat = self._run("COUNT_BY_STATE")
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._ended.close()
        self._queued.close()
        self.client.close()


class RedisOutbox:
    """The webhook outbox beside the jobs (its records are written by `RedisJobStore.submit`)."""

    def __init__(self, jobs: RedisJobStore) -> None:
        self.jobs = jobs

    def _run(self, name: str, *args: Any) -> Any:
        return self.jobs._run(name, *args)

    def claim_delivery(self, sender_id: str, *, token: str | None = None) -> tuple[Delivery, DeliveryLease] | None:
        """As `Outbox.claim_delivery`; with `token`, a retry of a claim that already took effect answers the
        same delivery and lease."""
        token = token if token is not None else self.jobs.policy.new_token(sender_id)
        record = self._run("CLAIM_DELIVERY", json.dumps(token), self.jobs.policy.lease_seconds)
        if not record:
            return None
        delivery = Delivery(**_fields(record))
        return delivery, DeliveryLease(delivery.id, token)

    def record_attempt(
        self, lease: DeliveryLease, attempt: dict[str, Any], state: DeliveryState, next_attempt_at: float = 0.0
    ) -> bool:
        # The caller's clock says when to retry; the server's clock keeps time, so it travels as a delay.
        delay = repr(next_attempt_at - time.time()) if next_attempt_at else ""
        return self._run("RECORD_ATTEMPT", lease.delivery_id, json.dumps(lease.token), json.dumps(attempt),
                         json.dumps(state), delay) == 1

    def deliveries(self, job_id: str) -> list[Delivery]:
        return [Delivery(**_fields(record)) for record in self._run("DELIVERIES", job_id)]


def _reclaim_delays(policy: LeasePolicy) -> list[float]:
    """`policy.reclaim_delay` after 1, 2, ... claims, as the scripts take it (they repeat the last one):
    up to `max_attempts`, or until the delay stops growing (its cap, or no backoff at all)."""
    delays = [policy.reclaim_delay(1)]
    for attempts in range(2, policy.max_attempts + 1):
        delay = policy.reclaim_delay(attempts)
        if delay == delays[-1]:
            break
        delays.append(delay)
    return delays


# -- the record: one hash field per dataclass field (Job, Delivery), each value JSON ------------------


def _flat(record: dict[str, Any]) -> list[str]:
    """field, value, field, value, ...: the record as HSET takes it."""
    return [item for name, value in record.items() for item in (name, json.dumps(value))]


def _delivery_record(delivery: Delivery) -> dict[str, Any]:
    return dataclasses.asdict(delivery)


def _fields(flat: list[str]) -> dict[str, Any]:
    """The dataclass fields of a flat HGETALL answer, decoded (`_`-fields are the store's own)."""
    pairs = zip(flat[::2], flat[1::2], strict=True)
    return {name: json.loads(value) for name, value in pairs if not name.startswith("_")}


def _decode_job(flat: list[str]) -> Job:
    return job_from_record(_fields(flat))


# -- waking waiters ------------------------------------------------------------------------------------


class _Wakeups:
    """One pub/sub subscription per channel and store; wakes the threads waiting for the keys (job ids,
    slugs) it hears published. A waiter registers before it reads the state it waits on, so no
    message is missed; a missed one (while reconnecting) costs a waiter its timeout, nothing more."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, *keys: str) -> Iterator[threading.Event]:
        """An event set when any of `keys` is published (`_ANY`: whatever is published)."""
        self._ensure_started()
        event = threading.Event()
        with self._lock:
            for key in keys:
                self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                for key in keys:
                    events = self._waiters.get(key, set())
                    events.discard(event)
                    if not events:
                        self._waiters.pop(key, None)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"redis-{self.channel}", daemon=True)
                self._thread.start()
        self._subscribed.wait(5)

    def _run(self) -> None:
        lost_at: float | None = None  # while the connection stays lost: since when (said once an outage)
        while not self._closed.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                pubsub.get_message(timeout=5)  # wait for the subscription to be in place
                if lost_at is not None:
                    log.info("Redis pub/sub on %s back after %.1fs", self.channel, time.monotonic() - lost_at)
                    lost_at = None
                self._wake_all()  # anything may have ended while we were not listening;
                # then newcomers, who register when nothing can be missed and need no wake-up
                self._subscribed.set()
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        self._wake(message["data"])
            except (redis.RedisError, OSError, ValueError):
                if not self._closed.is_set():
                    if lost_at is None:
                        lost_at = time.monotonic()
                        log.warning("lost the Redis pub/sub connection on %s; resubscribing", self.channel)
                    self._closed.wait(0.5)
            finally:
                pubsub.close()

    def _wake(self, key: str) -> None:
        with self._lock:
            for event in (*self._waiters.get(key, ()), *self._waiters.get(_ANY, ())):
                event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._waiters.values():
                for event in events:
                    event.set()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=3)
