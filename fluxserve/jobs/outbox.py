"""The durable webhook outbox: messages owed to receivers once their job starts or ends.

A job's deliveries are written by `JobStore.submit` in the same transaction as the job (so a job
never exists without the webhooks it promised) and deleted with it by `purge_expired`; the `Outbox`
protocol is the sender's side: lease a due message, record an attempt.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

DeliveryTrigger = Literal["started", "finished"]
DeliveryState = Literal["pending", "delivered", "failed"]


@dataclass
class Delivery:
    """One message: a POST owed to `url` once its job reaches `trigger`.

    `trigger` "started" is due once the job has been claimed (started_at set); "finished" once it is
    COMPLETED or FAILED, whichever way it got there.
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
class DeliveryLease:
    """What a sender holds while it tries one delivery."""

    delivery_id: str
    token: str


class Outbox(Protocol):
    def claim_delivery(self, sender_id: str, *, token: str | None = None) -> tuple[Delivery, DeliveryLease] | None:
        """Lease the due pending delivery (trigger holds, `next_attempt_at` passed, no live lease) that is
        due first, under `token` (default: a new one); the lease lasts as long as a job's. Safe to retry:
        a delivery already leased under `token` is returned again."""
        ...

    def record_attempt(
        self, lease: DeliveryLease, attempt: dict[str, Any], state: DeliveryState, next_attempt_at: float = 0.0
    ) -> bool:
        """Append `attempt` to the leased delivery, set its `state` (and `next_attempt_at` when it stays
        pending) and release the lease; False (and no change) when the lease is stale."""
        ...

    def deliveries(self, job_id: str) -> list[Delivery]:
        """The job's deliveries, oldest first."""
        ...
