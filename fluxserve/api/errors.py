"""Every error the API answers is `{"error": "..."}` with the contract's status code; nothing leaks.

Domain errors map to status codes in one table; a transient store fault (`fluxserve.store_faults`),
whichever route meets it, is a 503 with `Retry-After` (507 when the disk is full); anything unexpected
is a 500 with a log reference.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Mapping

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.api.security import SECURITY_HEADERS
from fluxserve.app.errors import (
    Conflict,
    CreditsExhausted,
    DomainError,
    Forbidden,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    OutOfSpace,
    RateLimited,
    StillRunning,
    Unauthenticated,
    Unavailable,
)
from fluxserve.contract import error_body
from fluxserve.store_faults import StoreUnavailable, as_unavailable, is_transient

log = logging.getLogger(__name__)

STATUS_OF: dict[type[DomainError], int] = {
    InvalidRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    CreditsExhausted: 406,
    Conflict: 409,
    RateLimited: 429,
    ModelUnavailable: 502,
    StillRunning: 504,
    Unavailable: 503,
    OutOfSpace: 507,
}

# What the stores raise (besides StoreUnavailable): each is looked at by `store_fault`, which tells a
# passing fault (503) from a real failure (500).
STORE_ERRORS: tuple[type[Exception], ...] = (StoreUnavailable, sqlite3.Error, redis.RedisError, OSError)
try:
    import psycopg

    STORE_ERRORS += (psycopg.Error,)
except ImportError:  # pragma: no cover
    pass


def store_fault(exc: BaseException) -> Unavailable | None:
    """The domain error a transient store fault is answered with; None for anything else."""
    if not is_transient(exc):
        return None
    unavailable = exc if isinstance(exc, StoreUnavailable) else as_unavailable(exc)
    kind = OutOfSpace if unavailable.disk_full else Unavailable
    return kind(str(unavailable), retry_after=unavailable.retry_after)


class ApiError(Exception):
    """An error that exists only in HTTP terms (a wrong method, an unknown route)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message), status_code=status, headers=headers)


def domain_response(exc: DomainError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    return error_response(STATUS_OF[type(exc)], exc.message, {**(headers or {}), **retry} or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain_error(_request: Request, exc: DomainError) -> JSONResponse:
        return domain_response(exc)

    async def _store_error(request: Request, exc: Exception) -> JSONResponse:
        fault = store_fault(exc)
        if fault is None:
            return internal_error(request, exc)
        log.warning("store unavailable on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return domain_response(fault)

    for kind in STORE_ERRORS:
        app.add_exception_handler(kind, _store_error)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "Not found"
        return error_response(exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(part) for part in first["loc"][1:]) or "request"
        return error_response(400, f"{field}: {first['msg']}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Answered from outside the middleware stack (Starlette's ServerErrorMiddleware): add the headers here.
        fault = store_fault(exc)
        if fault is not None:
            log.warning("store unavailable on %s %s: %s: %s", request.method, request.url.path,
                        type(exc).__name__, exc)
            return domain_response(fault, SECURITY_HEADERS)
        return internal_error(request, exc, SECURITY_HEADERS)


def internal_error(request: Request, exc: BaseException, headers: Mapping[str, str] | None = None) -> JSONResponse:
    ref = uuid.uuid4().hex[:12]
    log.error("internal error ref=%s on %s %s", ref, request.method, request.url.path, exc_info=exc)
    return error_response(500, f"Internal server error (ref {ref})", headers)
