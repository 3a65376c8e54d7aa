"""Admitting a job to the queue: the key's rate limit (429 + Retry-After), the credit reservation
(406 when the credits cannot cover it; 429 when the key has its limit of jobs in flight), then the
job store. A job that never reaches the store gives its reservation back."""

from __future__ import annotations

import math

import anyio
from fastapi import Request

from fluxserve.accounts import NotEnoughCredits, TooManyInFlight
from fluxserve.accounts.money import to_credits
from fluxserve.api.auth import Caller
from fluxserve.api.common import services_of
from fluxserve.api.errors import ApiError
from fluxserve.api.submission import SubmitOptions, store_job
from fluxserve.jobs import Job


async def admit(request: Request, caller: Caller, job: Job, options: SubmitOptions) -> Job:
    """The stored job: this one, or an earlier one with the same Idempotency-Key (charged once)."""
    services = services_of(request)
    if caller.account is not None:
        await _take_rate_token(request, caller)
        await _reserve(request, caller, job)
    try:
        services.faults.before_submit(job.params["positivePrompt"])
        stored = await store_job(request, job, options)
    except BaseException:
        if caller.account is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_release_unless_queued, services, job.id)
        raise
    if stored.id != job.id and caller.account is not None:
        # An idempotent replay: the earlier job holds the charge; this attempt's reservation goes back.
        await anyio.to_thread.run_sync(lambda: services.access.store.settle(job.id, charge=False))
    return stored


async def _take_rate_token(request: Request, caller: Caller) -> None:
    rate = caller.account.rate_per_minute
    if not rate:
        return
    store = services_of(request).access.store
    wait = await anyio.to_thread.run_sync(store.take_token, f"key:{caller.key.id}", rate)
    if wait:
        seconds = math.ceil(wait)
        raise ApiError(
            429,
            f"Rate limit exceeded: this key may make {rate:g} generation requests per minute; retry in {seconds}s",
            headers={"Retry-After": str(seconds)},
        )


async def _reserve(request: Request, caller: Caller, job: Job) -> None:
    access = services_of(request).access
    cost = access.price(job.params)
    try:
        await anyio.to_thread.run_sync(access.store.reserve, job.id, caller.account.id, caller.key.id, cost)
    except NotEnoughCredits as exc:
        raise ApiError(
            406,
            f"Not enough credits: this request costs {to_credits(cost):g} credits and the account has "
            f"{to_credits(exc.available):g} available",
        ) from None
    except TooManyInFlight as exc:
        raise ApiError(
            429,
            f"Too many requests in flight: this key may have {exc.limit} at a time; retry when one finishes",
            headers={"Retry-After": "1"},
        ) from None
    job.meta["cost"] = to_credits(cost)


def _release_unless_queued(services, job_id: str) -> None:
    # The store may have kept the job even though the call failed; only a job it lacks is released.
    # If even this fails, the janitor releases the orphaned reservation later.
    if services.store.get(job_id) is None:
        services.access.store.settle(job_id, charge=False)
