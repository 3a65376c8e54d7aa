"""Settling a job's reservation: charge on COMPLETED, release on FAILED, exactly once.

The worker calls `settle_job` right after it completes or fails a job; the janitor calls
`settle_open` now and then, which settles every terminal job whose reservation is still open (the
process died between the two steps, or the job ended without a worker: lease retries exhausted, a
cancel). Both go through the store's once-only `settle`, so they can race freely. Only the job's
state is read, through the JobStore protocol, so any job backend works.
"""

from __future__ import annotations

import logging
import time

from fluxserve.accounts import AccountStore
from fluxserve.contract import JobState
from fluxserve.jobs import Job, JobStore

log = logging.getLogger(__name__)


def settle_job(accounts: AccountStore, job: Job | None) -> bool:
    """Settle the job if it is terminal; True when this call moved the money."""
    if job is None or job.owner is None or not job.state.terminal:
        return False  # a job without an owner was submitted with auth off: nothing was reserved
    settled = accounts.settle(job.id, charge=job.state is JobState.COMPLETED)
    if settled:
        log.info("job %s settled: %s", job.id, "charged" if job.state is JobState.COMPLETED else "released")
    return settled


# Far longer than a submit takes between reserving and enqueueing (even behind a busy store lock).
ORPHAN_AFTER_SECONDS = 300.0


def settle_open(accounts: AccountStore, jobs: JobStore, *, orphan_after_seconds: float = ORPHAN_AFTER_SECONDS) -> int:
    """Settle every open reservation whose job has ended. A reservation whose job is gone (the submit
    never reached the job store, or the job expired unsettled) is released once it is old enough that
    no submit can still be on its way."""
    settled = 0
    now = time.time()
    for reservation in accounts.open_reservations():
        job = jobs.get(reservation.job_id)
        if job is not None:
            settled += settle_job(accounts, job)
        elif now - reservation.created_at > orphan_after_seconds:
            if accounts.settle(reservation.job_id, charge=False):
                log.warning("reservation for job %s released: the job no longer exists", reservation.job_id)
                settled += 1
    return settled
