"""What a submit may carry besides the model's parameters, and storing the job with it.

- `webhook` / `webhook_events_filter` (body): where and when to POST the result (see `fluxserve.webhooks`).
- `cancel_after` (body) or `Cancel-After` (header): a deadline after which the job is cancelled.
- `Idempotency-Key` (header): the same key and request within the job's lifetime give the same
  `request_id`; the same key with another request answers 409.

These fields are taken out of the body before it is validated as the model's parameters, so a job's
`params` stay exactly the contract's.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from fluxserve.api.auth import signed_media_query
from fluxserve.api.common import base_url, services_of
from fluxserve.api.errors import ApiError, bad_request
from fluxserve.cancel import deadline_meta, parse_cancel_after
from fluxserve.contract import GenerateRequest
from fluxserve.jobs import IdempotencyConflict, IdempotencyKey, Job
from fluxserve.webhooks import DEFAULT_EVENTS, EVENT_TRIGGERS, deliveries_for
from fluxserve.webhooks.targets import WebhookTargetError, check_url

MAX_IDEMPOTENCY_KEY_LENGTH = 255

SUBMIT_OPTION_SCHEMA: dict[str, Any] = {
    "webhook": {
        "type": "string",
        "format": "uri",
        "description": "POST the result here when the request ends",
    },
    "webhook_events_filter": {
        "type": "array",
        "items": {"enum": list(EVENT_TRIGGERS)},
        "description": "Which events to send: 'completed' (default) and/or 'start'",
    },
    "cancel_after": {
        "anyOf": [{"type": "number"}, {"type": "string"}],
        "description": "Cancel the request after this many seconds, or a duration such as '90s' or '5m'",
    },
}
SUBMIT_HEADERS_DOC = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Retry-safe submit: the same key and body give the same request_id",
    },
    {
        "name": "Cancel-After",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Deadline: seconds, or a duration such as '90s' or '5m'",
    },
]


def submit_body_schema() -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema()
    return {**schema, "properties": {**schema["properties"], **SUBMIT_OPTION_SCHEMA}}


@dataclass
class SubmitOptions:
    fingerprint: str
    webhook: str | None = None
    events: list[str] = field(default_factory=lambda: list(DEFAULT_EVENTS))
    cancel_after: float | None = None
    idempotency_key: str | None = None


def take_submit_options(request: Request, payload: object) -> SubmitOptions:
    """Remove the submit options from the decoded body (in place) and validate them; 400 when invalid."""
    cancel_header = request.headers.get("cancel-after")
    options = SubmitOptions(fingerprint=_fingerprint(payload, cancel_header))
    options.idempotency_key = _idempotency_key(request.headers.get("idempotency-key"))
    if not isinstance(payload, dict):
        return options  # the parameter validation answers this one
    webhook = payload.pop("webhook", None)
    if webhook is not None:
        if not isinstance(webhook, str):
            raise bad_request("webhook: must be an http(s) URL")
        options.webhook = webhook
    events = payload.pop("webhook_events_filter", None)
    if events is not None:
        if not isinstance(events, list) or not events or any(event not in EVENT_TRIGGERS for event in events):
            raise bad_request(
                "webhook_events_filter: must be a non-empty list of " + ", ".join(map(repr, EVENT_TRIGGERS))
            )
        options.events = events
    cancel_after = payload.pop("cancel_after", None)
    if cancel_header is not None:
        cancel_after = cancel_header
    if cancel_after is not None:
        try:
            options.cancel_after = parse_cancel_after(cancel_after)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
    return options


def _fingerprint(payload: object, cancel_header: str | None) -> str:
    canonical = json.dumps(
        {"body": payload, "cancel_after": cancel_header}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH or not value.isprintable():
        raise bad_request(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable characters")
    return value


async def store_job(request: Request, job: Job, options: SubmitOptions) -> Job:
    """Submit the job with its webhook deliveries, deadline and idempotency key; the stored job
    (an earlier one, when the idempotency key was seen before)."""
    services = services_of(request)
    settings = services.settings
    webhook = options.webhook or services.webhooks.default_url(job.owner)
    deliveries = []
    if webhook:
        try:
            await anyio.to_thread.run_sync(
                lambda: check_url(webhook, allow_private=settings.webhook_allow_private)
            )
        except WebhookTargetError as exc:
            raise bad_request(f"webhook: {exc}") from None
        job.meta["webhook"] = {
            "url": webhook,
            "base_url": base_url(request),
            "media_query": signed_media_query(request, job.id),
        }
        deliveries = deliveries_for(job.id, webhook, options.events)
    if options.cancel_after is not None:
        job.created_at = job.created_at or time.time()
        job.meta.update(deadline_meta(job.created_at, options.cancel_after))
    idempotency = (
        IdempotencyKey(options.idempotency_key, options.fingerprint, job.owner)
        if options.idempotency_key
        else None
    )
    try:
        stored = await anyio.to_thread.run_sync(
            lambda: services.store.submit(job, deliveries=deliveries, idempotency=idempotency)
        )
    except IdempotencyConflict as exc:
        raise ApiError(
            409,
            f"Idempotency-Key {options.idempotency_key!r} was already used with a different request "
            f"(request {exc.job_id}); use a new key for a new request",
        ) from None
    if stored.id == job.id:  # a new job, not an idempotent replay
        services.deadlines.watch(stored)
    return stored
