"""The queue's rules, written once and shared by every backend: lease tokens, the retry budget,
retention, and how an Idempotency-Key is scoped."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from fluxserve.jobs import IdempotencyKey

RECLAIM_DELAY_CAP = 600.0


@dataclass(frozen=True)
class LeasePolicy:
    lease_seconds: float = 30.0
    max_attempts: int = 3  # claims a job may have before a lapsed lease fails it
    retention_seconds: float = 3600.0  # how long an ended job (and its media) is kept
    # A job whose worker died goes back to the queue only after this delay, doubled for each attempt it
    # already had (capped at `RECLAIM_DELAY_CAP`): a worker that crashes right after every claim spreads
    # its damage over fresh jobs instead of burning one job's attempts within seconds.
    reclaim_backoff_seconds: float = 30.0

    @staticmethod
    def new_token(holder_id: str) -> str:
        """A token naming one attempt of one holder; a stale holder's transitions carry an old one."""
        return f"{holder_id}:{uuid.uuid4().hex}"

    def reclaim_delay(self, attempts: int) -> float:
        """How long after its lease lapsed a job that had `attempts` claims may be claimed again."""
        return min(self.reclaim_backoff_seconds * 2 ** max(attempts - 1, 0), RECLAIM_DELAY_CAP)

    @property
    def exhausted_error(self) -> str:
        """Why a job whose lease lapsed on its last allowed attempt ends FAILED."""
        return f"The worker running this job stopped responding {self.max_attempts} time(s); giving up"


def idempotency_scope(idempotency: IdempotencyKey) -> str:
    """One key namespace per owner: two accounts may use the same key without seeing each other's jobs."""
    return json.dumps([idempotency.owner, idempotency.key])
