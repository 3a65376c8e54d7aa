"""Submitting a generation: validate the request once, admit it, and queue it with what it carries.

Besides the model's parameters a submit may carry:
- `webhook` / `webhook_events_filter` (body): where and when to POST the result (see `fluxserve.webhooks`);
- `cancel_after` (body) or `Cancel-After` (header): a deadline after which the job is cancelled;
- `Idempotency-Key` (header): the same key and request within the job's lifetime give the same
  `request_id`; the same key with another request is a Conflict.
These are taken out of the body before it is validated as the model's parameters, so a job's `params`
are exactly the contract's.

Admission, in order: the key's rate limit, the credit reservation (`billing`), then the store. A job
that never reaches the store gives its reservation back. A store call that fails for a passing reason
(`fluxserve.store_faults`) may still have stored the job: it is looked up, and a stored job is answered
as a successful submit; only a job the store lacks is answered "unavailable" (503, its credits released).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from fluxserve.accounts import AccountStore
from fluxserve.app.access import Access, Caller
from fluxserve.app.billing import Billing
from fluxserve.app.body import decode_json
from fluxserve.app.control import DeadlineWatcher, parse_cancel_after
from fluxserve.app.errors import Conflict, DomainError, InvalidRequest, NotFound, RateLimited
from fluxserve.app.webhook_owners import OwnerWebhooks
from fluxserve.contract import GenerateRequest, RequestError, parse_request
from fluxserve.engine.lora import LoraRegistry, UnknownLora
from fluxserve.jobs import (
    Deadline,
    IdempotencyConflict,
    IdempotencyKey,
    Job,
    JobMeta,
    JobStore,
    WebhookTarget,
    new_job_id,
)
from fluxserve.store_faults import as_unavailable, is_transient
from fluxserve.webhooks import DEFAULT_EVENTS, EVENT_TRIGGERS, deliveries_for
from fluxserve.webhooks.targets import WebhookTargetError, check_url

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LENGTH = 255
# After a submit failed for a passing reason, the job is looked up (to answer truthfully) at once,
# then again after these pauses while the store itself does not answer.
LOOKUP_PAUSES = (0.0, 0.2, 0.5)

SUBMIT_OPTION_SCHEMA: dict[str, Any] = {
    "webhook": {
        "type": "string",
        "format": "uri",
        "description": "POST the result here when the request ends",
    },
    "webhook_events_filter": {
        "type": "array",
        "items": {"enum": list(EVENT_TRIGGERS)},
        "minItems": 1,
        "description": "Which events to send: 'completed' (default) and/or 'start'",
    },
    "cancel_after": {
        "anyOf": [{"type": "number"}, {"type": "string"}],
        "description": "Cancel the request after this many seconds, or a duration such as '90s' or '5m'",
    },
}


def submit_body_schema() -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema()
    return {**schema, "properties": {**schema["properties"], **SUBMIT_OPTION_SCHEMA}}


@dataclass(frozen=True)
class SubmitHeaders:
    """What a submit's HTTP headers say, as plain values."""

    idempotency_key: str | None = None
    cancel_after: str | None = None


@dataclass
class SubmitOptions:
    fingerprint: str
    webhook: str | None = None
    events: list[str] = field(default_factory=lambda: list(DEFAULT_EVENTS))
    cancel_after: float | None = None
    idempotency_key: str | None = None


def take_submit_options(payload: object, headers: SubmitHeaders) -> SubmitOptions:
    """Remove the submit options from the decoded body (in place) and validate them."""
    options = SubmitOptions(fingerprint=_fingerprint(payload, headers.cancel_after))
    options.idempotency_key = _idempotency_key(headers.idempotency_key)
    if not isinstance(payload, dict):
        return options  # the parameter validation answers this one
    webhook = payload.pop("webhook", None)
    if webhook is not None:
        if not isinstance(webhook, str):
            raise InvalidRequest("webhook: must be an http(s) URL")
        options.webhook = webhook
    events = payload.pop("webhook_events_filter", None)
    if events is not None:
        if not isinstance(events, list) or not events or any(event not in EVENT_TRIGGERS for event in events):
            raise InvalidRequest(
                "webhook_events_filter: must be a non-empty list of " + ", ".join(map(repr, EVENT_TRIGGERS))
            )
        options.events = events
    cancel_after = payload.pop("cancel_after", None)
    if headers.cancel_after is not None:
        cancel_after = headers.cancel_after
    if cancel_after is not None:
        try:
            options.cancel_after = parse_cancel_after(cancel_after)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    return options


def _fingerprint(payload: object, cancel_header: str | None) -> str:
    canonical = json.dumps({"body": payload, "cancel_after": cancel_header}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH or not value.isprintable():
        raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable characters")
    return value


class Submitter:
    def __init__(
        self,
        *,
        slug: str,
        jobs: JobStore,
        accounts: AccountStore,
        access: Access,
        billing: Billing,
        webhooks: OwnerWebhooks,
        deadlines: DeadlineWatcher,
        allow_private_webhooks: bool,
        model_unavailable: Callable[[str], DomainError | None] = lambda _slug: None,
        slugs: Collection[str] | None = None,
        billing_for: Callable[[str], Billing] | None = None,
        loras_for: Callable[[str], LoraRegistry | None] = lambda _slug: None,
    ) -> None:
        self.slug = slug  # the model a submit is for unless it names another
        # Every model that may be asked for (None: only `slug`); another is NotFound.
        self.slugs = slugs if slugs is not None else (slug,)
        self.jobs = jobs
        self.accounts = accounts
        self.access = access
        self.billing = billing
        self.webhooks = webhooks
        self.deadlines = deadlines
        self.allow_private_webhooks = allow_private_webhooks
        # Why no job for a model can run (it failed to load, no worker serves it), or None.
        self.model_unavailable = model_unavailable
        # The billing that prices a model's jobs (each model may have its own price).
        self.billing_for = billing_for or (lambda _slug: billing)
        # The LoRA adapters a model's requests may name (None: no check here, the worker's engine decides).
        self.loras_for = loras_for

    def submit(self, caller: Caller, body: bytes, headers: SubmitHeaders, base_url: str, *,
               slug: str | None = None) -> Job:
        """The stored job: this one, or an earlier one with the same Idempotency-Key (charged once)."""
        slug = slug or self.slug
        if slug not in self.slugs:
            raise NotFound(f"Model not found: {slug}")
        self.access.authorize_model(caller, slug)
        payload = decode_json(body)
        options = take_submit_options(payload, headers)
        try:
            params = parse_request(payload).with_resolved_seed()
            self._check_loras(slug, params)
        except RequestError as exc:
            raise InvalidRequest(str(exc)) from None
        idempotency = None
        if options.idempotency_key:
            fingerprint = options.fingerprint
            if slug != self.slug:  # one key, the same body, another model: another request
                fingerprint = hashlib.sha256(f"{slug}:{fingerprint}".encode()).hexdigest()
            idempotency = IdempotencyKey(options.idempotency_key, fingerprint, caller.account_id)
            earlier = self._replay(idempotency)
            if earlier is not None:  # answered from the stored request: neither throttled nor charged
                return earlier
        problem = self.model_unavailable(slug)
        if problem is not None:
            raise problem
        job = Job(id=new_job_id(), slug=slug, params=params, owner=caller.account_id, created_at=time.time())
        self._take_rate_token(caller)
        cost = self.billing_for(slug).reserve(caller, job)
        try:
            stored = self._store(job, cost, options, idempotency, caller, base_url)
        except Exception as exc:
            if not is_transient(exc):
                self._release(caller, job.id)
                raise
            # Ambiguous: the store may have kept the job before the call failed. What it holds decides.
            found = self._look_up(job.id)
            if found is None:
                self._release(caller, job.id)
                raise as_unavailable(exc) from exc
            log.warning("submit of job %s failed (%s: %s) but the store kept it; answered as queued",
                        job.id, type(exc).__name__, exc)
            self.deadlines.watch(found)
            return found
        except BaseException:
            self._release(caller, job.id)
            raise
        if stored.id != job.id:
            self.billing.refund_replay(caller, job.id)
        return stored

    def _check_loras(self, slug: str, params: GenerateRequest) -> None:
        """An adapter the model's registry lacks is a 400 (listing the registered names), never a job."""
        registry = self.loras_for(slug) if params.loras else None
        if registry is None:
            return
        try:
            registry.check(lora.name for lora in params.loras)
        except UnknownLora as exc:
            raise RequestError(f"loras: {exc}") from None

    def _look_up(self, job_id: str) -> Job | None:
        """The job as the store holds it after a failed submit; None when it is not there (or the
        store cannot say: then the janitor settles its reservation once the store answers)."""
        for pause in LOOKUP_PAUSES:
            time.sleep(pause)
            try:
                return self.jobs.get(job_id)
            except Exception as exc:
                if not is_transient(exc):
                    break
        return None

    def _release(self, caller: Caller, job_id: str) -> None:
        try:
            self.billing.release_unless_queued(caller, job_id)
        except Exception:  # the janitor's sweep releases an orphaned reservation later
            log.warning("releasing the reservation of job %s failed; the janitor will", job_id, exc_info=True)

    def _take_rate_token(self, caller: Caller) -> None:
        if caller.account is None or caller.key is None or not caller.account.rate_per_minute:
            return
        rate = caller.account.rate_per_minute
        wait = self.accounts.take_token(f"key:{caller.key.id}", rate)
        if wait:
            seconds = math.ceil(wait)
            raise RateLimited(
                f"Rate limit exceeded: this key may make {rate:g} generation requests per minute; "
                f"retry in {seconds}s",
                retry_after=seconds,
            )

    def _replay(self, idempotency: IdempotencyKey) -> Job | None:
        try:
            return self.jobs.find_idempotent(idempotency)
        except IdempotencyConflict as exc:
            raise _conflict(idempotency.key, exc.job_id) from None

    def _store(
        self,
        job: Job,
        cost: float,
        options: SubmitOptions,
        idempotency: IdempotencyKey | None,
        caller: Caller,
        base_url: str,
    ) -> Job:
        """Submit the job with its webhook deliveries, deadline and idempotency key."""
        url = options.webhook or self.webhooks.default_url(job.owner)
        webhook, deliveries = None, []
        if url:
            try:
                check_url(url, allow_private=self.allow_private_webhooks)
            except WebhookTargetError as exc:
                raise InvalidRequest(f"webhook: {exc}") from None
            webhook = WebhookTarget(url, base_url)
            deliveries = deliveries_for(job.id, url, options.events)
        deadline = None
        if options.cancel_after is not None:
            deadline = Deadline(options.cancel_after, job.created_at + options.cancel_after)
        job.meta = JobMeta(webhook=webhook, deadline=deadline, cost=cost,
                           key_id=caller.key.id if caller.key else None)
        try:
            # A concurrent submit with the same key may have won since the replay check: the store
            # decides atomically, and the loser's reservation is refunded by the caller.
            stored = self.jobs.submit(job, deliveries=deliveries, idempotency=idempotency)
        except IdempotencyConflict as exc:
            raise _conflict(options.idempotency_key or "", exc.job_id) from None
        if stored.id == job.id:  # a new job, not an idempotent replay
            self.deadlines.watch(stored)
        return stored


def _conflict(key: str, job_id: str) -> Conflict:
    return Conflict(
        f"Idempotency-Key {key!r} was already used with a different request (request {job_id}); "
        "use a new key for a new request"
    )
