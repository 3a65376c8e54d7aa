"""Every money move, in one place. Credits move in three steps, each an append-only ledger row:

    reserve  at submit: the job's price is held (406 when the available credits cannot cover it;
             429 when the key has its limit of jobs in flight)
    charge   the job COMPLETED: the held amount leaves the balance
    release  the job FAILED (or was cancelled, or never reached the queue): the amount is free again

Each event settles through `settle`, which the account store runs once per job whoever asks and
however often: the worker right after a job ends, v1 before it answers, cancel, and the janitor's
sweep (`settle_open`) for anything a crash left open. An idempotent replay's own reservation is
refunded at once (the first job holds the charge). Jobs submitted with auth off reserve nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fluxserve.accounts import AccountStore, NotEnoughCredits, TooManyInFlight
from fluxserve.accounts.money import price, to_credits
from fluxserve.app.access import Caller
from fluxserve.app.errors import CreditsExhausted, RateLimited
from fluxserve.config import AccountSettings
from fluxserve.contract import GenerateRequest, JobState
from fluxserve.jobs import Job, JobStore

log = logging.getLogger(__name__)

# Far longer than a submit takes between reserving and enqueueing (even behind a busy store lock).
ORPHAN_AFTER_SECONDS = 300.0


class Billing:
    def __init__(self, accounts: AccountStore, jobs: JobStore, pricing: AccountSettings) -> None:
        self.accounts = accounts
        self.jobs = jobs
        self.pricing = pricing

    def price(self, params: GenerateRequest) -> int:
        """The request's price in micro-credits."""
        return price(params.width, params.height, params.steps, per_image=self.pricing.price_per_image,
                     per_megapixel_step=self.pricing.price_per_megapixel_step)

    def price_list(self) -> dict[str, Any]:
        return {"per_image": self.pricing.price_per_image,
                "per_megapixel_step": self.pricing.price_per_megapixel_step}

    def reserve(self, caller: Caller, job: Job) -> float:
        """Hold the job's price on the caller's account; the credits held (0 when nothing is metered)."""
        if caller.account is None or caller.key is None:
            return 0.0
        cost = self.price(job.params)
        try:
            self.accounts.reserve(job.id, caller.account.id, caller.key.id, cost)
        except NotEnoughCredits as exc:
            raise CreditsExhausted(
                f"Not enough credits: this request costs {to_credits(cost):g} credits and the account has "
                f"{to_credits(exc.available):g} available"
            ) from None
        except TooManyInFlight as exc:
            raise RateLimited(
                f"Too many requests in flight: this key may have {exc.limit} at a time; retry when one finishes",
                retry_after=1,
            ) from None
        return to_credits(cost)

    def refund_replay(self, caller: Caller, attempt_id: str) -> None:
        """An idempotent replay: the earlier job holds the charge; this attempt's reservation goes back."""
        if caller.account is not None:
            self.accounts.settle(attempt_id, charge=False)

    def release_unless_queued(self, caller: Caller, job_id: str) -> None:
        """A submit failed after reserving. The store may have kept the job even though the call failed;
        only a job it lacks is released (if even this fails, the janitor releases it later)."""
        if caller.account is not None and self.jobs.get(job_id) is None:
            self.accounts.settle(job_id, charge=False)

    def settle(self, job: Job | None) -> bool:
        """Charge (COMPLETED) or release (FAILED) an ended job's reservation; True when this call moved it."""
        if job is None or job.owner is None or not job.state.terminal:
            return False
        settled = self.accounts.settle(job.id, charge=job.state is JobState.COMPLETED)
        if settled:
            log.info("job %s settled: %s", job.id, "charged" if job.state is JobState.COMPLETED else "released")
        return settled

    def settle_id(self, job_id: str) -> bool:
        return self.settle(self.jobs.get(job_id))

    def settle_open(self, orphan_after_seconds: float = ORPHAN_AFTER_SECONDS) -> int:
        """Settle every open reservation whose job has ended. A reservation whose job is gone (the submit
        never reached the job store, or the job expired unsettled) is released once it is old enough that
        no submit can still be on its way."""
        settled = 0
        now = time.time()
        for reservation in self.accounts.open_reservations():
            job = self.jobs.get(reservation.job_id)
            if job is not None:
                settled += self.settle(job)
            elif now - reservation.created_at > orphan_after_seconds:
                settled += self._release_orphan(reservation.job_id)
        return settled

    def _release_orphan(self, job_id: str) -> bool:
        released = self.accounts.settle(job_id, charge=False)
        if released:
            log.warning("reservation for job %s released: the job no longer exists", job_id)
        return released
