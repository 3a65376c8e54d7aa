"""What can go wrong for a caller, said in the domain's words. The HTTP layer maps each class to a
status code in one table (`fluxserve.api.errors`); the message is what the client reads."""

from __future__ import annotations


class DomainError(Exception):
    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds, for the errors a client should retry


class InvalidRequest(DomainError):
    """The request is malformed or out of range."""


class Unauthenticated(DomainError):
    """No key, or an unknown or revoked one."""


class Forbidden(DomainError):
    """The key may not use this model or see this request."""


class NotFound(DomainError):
    """Unknown, expired, or not there any more."""


class CreditsExhausted(DomainError):
    """The account's available credits do not cover the request."""


class Conflict(DomainError):
    """The request contradicts the state it names (a reused Idempotency-Key, a cancel after the end)."""


class RateLimited(DomainError):
    """Too many requests per minute, or too many in flight; retry after `retry_after` seconds."""


class ModelUnavailable(DomainError):
    """The model failed to load: nothing can run."""


class StillRunning(DomainError):
    """A synchronous call's wait ran out; the request goes on."""


class Unavailable(DomainError):
    """A store the request needs cannot serve it now (down, restarting, locked); retry after `retry_after`."""


class OutOfSpace(Unavailable):
    """The store's disk is full: nothing new can be written until space is freed."""
