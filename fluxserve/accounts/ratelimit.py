"""GCRA (the generic cell rate algorithm): a token bucket kept as one number per key.

Instead of a token count it stores the "theoretical arrival time" (TAT) of the next request. A
request at `now` is allowed when the TAT is no further ahead than the burst allows; it then pushes
the TAT one emission interval on. One number per key and one compare-and-set per request is what
lets several API processes share a limit through their common store.
"""

from __future__ import annotations

import math


def burst_for(rate_per_minute: float) -> int:
    """A key may spend a whole minute's allowance at once, then one request per interval."""
    return max(1, math.ceil(rate_per_minute))


def gcra(tat: float | None, now: float, rate_per_minute: float) -> tuple[float, float]:
    """Return (new_tat, retry_after): retry_after is 0 when the request is allowed, else the seconds
    until it would be (and new_tat is then the unchanged TAT)."""
    interval = 60.0 / rate_per_minute
    tolerance = interval * (burst_for(rate_per_minute) - 1)
    tat = max(tat if tat is not None else now, now)
    wait = tat - now - tolerance
    if wait > 0:
        return tat, wait
    return tat + interval, 0.0
