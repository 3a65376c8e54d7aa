"""`GET /v1/account`: the calling key's account: credits, limits, allowed models, prices and default
webhook. `GET /v1/webhooks/default/secret` (Replicate's path and shape): the account's webhook signing
secret, for its receivers to verify signatures with."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request

from fluxserve.accounts.money import to_credits
from fluxserve.api.auth import authenticate
from fluxserve.api.common import services_of
from fluxserve.api.errors import not_found

router = APIRouter(tags=["account"])


@router.get("/v1/account")
async def account(request: Request) -> dict[str, Any]:
    caller = await authenticate(request)
    if caller.account is None:
        raise not_found("No account: this server does not ask for API keys, so calls are not metered")
    services = services_of(request)
    store = services.access.store
    current = await anyio.to_thread.run_sync(store.get_account, caller.account.id)
    in_flight = await anyio.to_thread.run_sync(store.in_flight, caller.key.id)
    return {
        "name": current.name,
        "key_id": caller.key.id,
        "balance": to_credits(current.balance),
        "reserved": to_credits(current.reserved),
        "available": to_credits(current.available),
        "limits": {
            "requests_per_minute": current.rate_per_minute or None,
            "jobs_in_flight": current.max_in_flight or None,
        },
        "jobs_in_flight": in_flight,
        "models": list(current.models) if current.models is not None else None,
        "webhook_url": current.webhook_url,
        "pricing": {
            "per_image": services.settings.price_per_image,
            "per_megapixel_step": services.settings.price_per_megapixel_step,
        },
    }


@router.get("/v1/webhooks/default/secret")
async def webhook_secret(request: Request) -> dict[str, str]:
    caller = await authenticate(request)
    if caller.account is None:
        raise not_found("No account: this server does not ask for API keys; the operator holds the secret")
    return {"key": caller.account.webhook_secret}  # the account as read for this request
