"""One way to reach Redis, for the job store and the output store."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, *, socket_timeout: float = 30, **options: Any) -> redis.Redis:
    """A client that rides out a Redis restart: broken connections are retried for a few seconds.
    `socket_timeout` bounds one reply: the default suits an image's bytes; small calls take less."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **options,
    )
