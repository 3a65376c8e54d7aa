"""The web playground: a static page at `/` (no build step), its assets, and the form's configuration.

The page learns the parameters, their ranges and the scheduler names from `/playground/config.json`,
which is derived from the contract, so it never disagrees with the API.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from fluxserve.api.deps import ServicesDep
from fluxserve.app.errors import NotFound
from fluxserve.contract import DEFAULT_PROMPT, GenerateRequest
from fluxserve.engine.schedulers import SCHEDULER_NAMES, SCHEDULERS

router = APIRouter(include_in_schema=False)

_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def web_file(name: str) -> bytes:
    return resources.files("fluxserve.web").joinpath(name).read_bytes()


@router.get("/", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse(web_file("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/playground/config.json")
async def playground_config(services: ServicesDep) -> dict[str, Any]:
    schema = GenerateRequest.model_json_schema()
    parameters = {name: _field(spec) for name, spec in schema["properties"].items() if name != "base64"}
    parameters["positivePrompt"]["default"] = DEFAULT_PROMPT
    parameters["seed"]["minimum"] = 0  # -1 (a random seed) is offered as its own button
    parameters["seed"]["maximum_text"] = str(parameters["seed"]["maximum"])  # beyond a JS number's precision
    return {
        "slug": services.directory.default,
        "required": schema.get("required", []),
        "parameters": parameters,
        "schedulers": [
            {"name": name, "description": SCHEDULERS[name].description}
            for name in SCHEDULER_NAMES
        ],
    }


def _field(spec: dict[str, Any]) -> dict[str, Any]:
    """One parameter's JSON schema, flattened to what a form needs (pydantic nests unions in anyOf)."""
    field: dict[str, Any] = {"type": "number" if "anyOf" in spec else spec.get("type", "string")}
    for source, target in (
        ("minimum", "minimum"),
        ("ge", "minimum"),
        ("maximum", "maximum"),
        ("le", "maximum"),
        ("default", "default"),
        ("enum", "enum"),
        ("maxLength", "maxLength"),
    ):
        if source in spec:
            field[target] = spec[source]
    return field


@router.get("/playground/{name}")
async def playground_asset(name: str) -> Response:
    if name not in _ASSETS:
        raise NotFound("Not found")
    return Response(web_file(name), media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})
