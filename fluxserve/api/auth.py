"""Who is calling: the API key (`x-api-key`, as the segmind SDK sends it, or `Authorization: Bearer`),
the account behind it, and what it may see. 401 for a missing, unknown or revoked key; 403 for a
model the key may not use or a job another account made. Keys are never logged or echoed.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from fastapi import Request

from fluxserve.accounts import Account, ApiKey
from fluxserve.accounts.access import Access
from fluxserve.accounts.keys import KeyRejected
from fluxserve.api.errors import ApiError
from fluxserve.jobs import Job


@dataclass(frozen=True)
class Caller:
    """The authenticated account and key; both None while auth is not enforced (anyone may call)."""

    account: Account | None = None
    key: ApiKey | None = None

    @property
    def account_id(self) -> str | None:
        return self.account.id if self.account else None


def access_of(request: Request) -> Access:
    return request.app.state.services.access


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def authenticate(request: Request) -> Caller:
    """The caller of this request (computed once per request)."""
    cached = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    access = access_of(request)
    caller = Caller()
    if await anyio.to_thread.run_sync(access.enforced):
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "Missing API key: send it in the x-api-key header or as Authorization: Bearer")
        try:
            account, record = await anyio.to_thread.run_sync(access.keyring.authenticate, key)
        except KeyRejected as exc:
            raise ApiError(401, str(exc)) from None
        caller = Caller(account, record)
    request.state.caller = caller
    return caller


def authorize_model(caller: Caller, slug: str) -> None:
    if caller.account is not None and not caller.account.allows(slug):
        raise ApiError(403, f"This API key is not allowed to use the model {slug}")


def authorize_job(caller: Caller, job: Job) -> None:
    if caller.account is not None and job.owner != caller.account.id:
        raise ApiError(403, f"Request {job.id} belongs to another account")


# -- signed media links: the URL in a result works without the key, for its owner to hand on ----


def _media_message(job_id: str) -> str:
    return f"media:{job_id}"


def signed_media_query(request: Request, job_id: str) -> str:
    """`?sig=...` for a media URL while auth is enforced (the caller is authenticated by then)."""
    caller = getattr(request.state, "caller", None)
    if caller is None or caller.account is None:
        return ""
    return f"?sig={access_of(request).keyring.sign(_media_message(job_id))}"


def has_media_signature(request: Request, job_id: str) -> bool:
    signature = request.query_params.get("sig")
    return bool(signature) and access_of(request).keyring.verify(_media_message(job_id), signature)
