"""Which store errors are passing weather and which are real failures, for every backend.

A transient fault (server refused, reset or restarting, a timeout, a locked or full database) says
nothing about the job: the worker retries it while its lease lasts and the API answers 503 with
`Retry-After` (507 for a full disk). Anything else (a corrupt file, a bad URL, a constraint) is a bug or
a misconfiguration and is raised as it is.
"""

from __future__ import annotations

import sqlite3

import psycopg
import redis
from psycopg_pool import PoolClosed

_SQLITE_TRANSIENT = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN"}
_SQLITE_TRANSIENT_PREFIXES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR")
# psycopg connection errors carry no sqlstate; only the text tells a misconfiguration from weather.
_PG_CONFIG_ERRORS = ("does not exist", "password authentication failed", "no pg_hba.conf entry", "invalid dsn")


class StoreUnavailable(Exception):
    """The store cannot serve this call now; try again in `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int = 2, disk_full: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.disk_full = disk_full


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, StoreUnavailable):
        return exc.disk_full
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
    if isinstance(exc, OSError):
        return exc.errno == 28  # ENOSPC
    if isinstance(exc, psycopg.errors.DiskFull):
        return True
    return isinstance(exc, redis.exceptions.OutOfMemoryError)


def is_transient(exc: BaseException) -> bool:
    """True for a store fault that may pass by itself (retry later); False for everything else."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name in _SQLITE_TRANSIENT or name.startswith(_SQLITE_TRANSIENT_PREFIXES):
            return True
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.OutOfMemoryError, redis.exceptions.TryAgainError)):
        return not isinstance(exc, redis.exceptions.AuthenticationError)
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(("LOADING", "MISCONF", "READONLY")):
        return True
    if isinstance(exc, PoolClosed):  # this process closed its store: shutting down, not weather
        return False
    if isinstance(exc, psycopg.errors.IdleInTransactionSessionTimeout):
        return True
    if isinstance(exc, psycopg.OperationalError):
        return exc.sqlstate is not None or not any(text in str(exc) for text in _PG_CONFIG_ERRORS)
    if isinstance(exc, psycopg.InterfaceError):  # a connection the server closed under us
        return True
    if isinstance(exc, OSError):
        return exc.errno in (28, 104, 110, 111, 113)  # ENOSPC, ECONNRESET, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH
    return isinstance(exc, TimeoutError | ConnectionError)


def as_unavailable(exc: BaseException) -> StoreUnavailable:
    """The error the API shows for a transient fault: what failed, in one line, with when to retry."""
    if is_disk_full(exc):
        return StoreUnavailable("The job store is out of disk space; try again later", retry_after=30, disk_full=True)
    return StoreUnavailable(f"The job store is unavailable ({type(exc).__name__}); try again shortly", retry_after=2)
