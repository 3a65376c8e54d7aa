"""Waits bounded by what the system promises, never by a clock the test started.

A drill on a busy machine may take several times as long as on an idle one; what does not change is
what the system promises: a lapsed lease is reclaimed after `lease + reclaim_delay(attempts)`, a worker
is ready once its process has started, a job takes its engine's time. A wait here ends on its condition
and fails only once the promise that governs it is broken by more than a generous margin, saying which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fluxserve.jobs import Job
from fluxserve.jobs.policy import LeasePolicy

from support.processes import FluxserveProcess

# How far past a promise a busy 2-core machine may still be: scheduling, interpreter start, store I/O.
MARGIN_S = 30.0
# How long a process may take to start and report ready, on a machine busy with other work.
START_BOUND_S = 180.0


def reclaimable_at(job: Job, policy: LeasePolicy) -> float:
    """The wall-clock time from which a job whose worker died may be claimed again."""
    assert job.lease_expires_at is not None, f"job {job.id} holds no lease"
    return job.lease_expires_at + policy.reclaim_delay(job.attempts)


def start_ready(process: FluxserveProcess) -> float:
    """Start a process and wait until it reports ready; the seconds that took (its restart time)."""
    started = time.monotonic()
    process.start().wait_ready(timeout=START_BOUND_S)
    return time.monotonic() - started


def wait_until(condition: Callable[[], Any], deadline: Callable[[], float], broken: Callable[[], str],
               poll: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy (returned). `deadline()` is re-read each time
    (a monotonic time that may move as the system's state does: a job's reclaim time, a worker's
    readiness); past it, fail with `broken()`, which names the promise that did not hold."""
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline():
            raise AssertionError(broken())
        time.sleep(poll)


def monotonic_of(wall: float) -> float:
    """A wall-clock instant (as the stores keep them) on the monotonic clock the waits compare with."""
    return time.monotonic() + (wall - time.time())
