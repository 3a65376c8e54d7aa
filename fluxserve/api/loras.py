"""`GET /v1/loras`: the LoRA adapters a request may name in `loras` (the operator's registry: `LORA_DIR`,
per model), each with its size and the models it applies to. `?model=SLUG` lists one model's."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import BaseModel

from fluxserve.api.deps import CallerDep, ServicesDep
from fluxserve.api.openapi import ERROR, KEYED_SECURITY, MEANING
from fluxserve.app.errors import NotFound
from fluxserve.contract import LORA_SCALE_MAX, LORA_SCALE_MIN, MAX_LORAS

router = APIRouter(tags=["loras"])


class LoraInfo(BaseModel):
    name: str
    bytes: int
    models: list[str]


class ScaleRange(BaseModel):
    minimum: float
    maximum: float


class LoraList(BaseModel):
    loras: list[LoraInfo]
    max_per_request: int
    scale: ScaleRange


def _answer(status: int) -> dict[str, Any]:
    return {"description": MEANING[status], "content": {"application/json": {"schema": ERROR}}}


@router.get("/v1/loras", response_model=LoraList, responses={401: _answer(401), 404: _answer(404)},
            openapi_extra={"security": KEYED_SECURITY})
async def list_loras(services: ServicesDep, caller: CallerDep, model: str | None = None) -> LoraList:
    """Every registered adapter by name (what a request's `loras` may name), its file size in bytes and the
    models whose requests may use it; `model` limits the list to one model's."""
    registries = services.loras
    if model is not None:
        if model not in registries:
            raise NotFound(f"Model not found: {model}")
        registries = {model: registries[model]}

    def collect() -> list[LoraInfo]:
        found: dict[str, LoraInfo] = {}
        for slug, registry in registries.items():
            for entry in registry.describe():
                info = found.setdefault(entry["name"], LoraInfo(name=entry["name"], bytes=entry["bytes"], models=[]))
                info.models.append(slug)
        return [found[name] for name in sorted(found)]

    return LoraList(loras=await anyio.to_thread.run_sync(collect), max_per_request=MAX_LORAS,
                    scale=ScaleRange(minimum=LORA_SCALE_MIN, maximum=LORA_SCALE_MAX))
