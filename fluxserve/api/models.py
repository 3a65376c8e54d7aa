"""`GET /v1/models`: the served models, in OpenAI's list shape with fluxserve's details beside.

One answer serves both kinds of client: OpenAI's (`client.models.list()` reads `id`, `object`,
`created`, `owned_by` and ignores the rest) and everyone else's (each model's state, endpoints, price
and request parameter schema). `GET /v1/models/{id}` is one of them (`client.models.retrieve`).
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter

from fluxserve.api.deps import ServicesDep
from fluxserve.app.errors import NotFound
from fluxserve.app.submit import submit_body_schema
from fluxserve.services import Services

router = APIRouter(tags=["models"])

OWNER = "fluxserve"


async def _listing(services: Services) -> list[dict[str, Any]]:
    directory = services.directory
    models = await anyio.to_thread.run_sync(directory.listing)
    parameters = submit_body_schema()
    return [
        {
            "id": model["id"],
            "object": "model",
            "created": directory.created,
            "owned_by": OWNER,
            **model,
            "endpoints": {"sync": f"/v1/{model['id']}", "async": f"/v2/{model['id']}",
                          "openai": "/v1/images/generations"},
            "parameters": parameters,
        }
        for model in models
    ]


@router.get("/v1/models")
async def list_models(services: ServicesDep) -> dict[str, Any]:
    """Every model this server routes: `id` (its slug in `/v1/{slug}`, `/v2/{slug}` and OpenAI's `model`),
    `state` (`ready`, `loading`, `failed`, `no worker`, or `queued` while no worker at all is up), its
    price and the JSON schema of its request body."""
    return {"object": "list", "data": await _listing(services)}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, services: ServicesDep) -> dict[str, Any]:
    """One served model, as `GET /v1/models` lists it."""
    if model_id not in services.directory:
        raise NotFound(f"Model not found: {model_id}")
    return next(model for model in await _listing(services) if model["id"] == model_id)
