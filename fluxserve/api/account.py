"""`GET /v1/account`: the calling key's account: credits, limits, allowed models, prices and default
webhook. `GET /v1/webhooks/default/secret` (Replicate's path and shape): the account's webhook signing
secret, for its receivers to verify signatures with."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter

from fluxserve.accounts.money import to_credits
from fluxserve.api.deps import CallerDep, ServicesDep
from fluxserve.app.errors import NotFound

router = APIRouter(tags=["account"])


@router.get("/v1/account")
async def account(services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    if caller.account is None or caller.key is None:
        raise NotFound("No account: this server does not ask for API keys, so calls are not metered")
    store, account_id, key_id = services.accounts, caller.account.id, caller.key.id
    current, in_flight = await anyio.to_thread.run_sync(
        lambda: (store.get_account(account_id), store.in_flight(key_id))
    )
    if current is None:
        raise NotFound("No account: it was removed")
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
        "pricing": services.billing.price_list(),
    }


@router.get("/v1/webhooks/default/secret")
async def webhook_secret(caller: CallerDep) -> dict[str, str | None]:
    if caller.account is None:
        raise NotFound("No account: this server does not ask for API keys; the operator holds the secret")
    return {"key": caller.account.webhook_secret}  # the account as read for this request
