"""The OpenAPI document as the server really answers, and `/docs` (Swagger UI) served offline.

FastAPI documents a 422 validation body that this API never sends (its validation errors are 400
`{"error": ...}`, and 422 is a FAILED request's result) and none of the errors the routes raise. The
document is post-processed once: each route gets its error answers with the `Error` schema, the
routes that take an API key get their security schemes, and the bodies FastAPI cannot see (v1's
base64 JSON, the metrics text, the media redirect) are added.
"""

from __future__ import annotations

import functools
from typing import Any

import fastapi.routing
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from fluxserve.api.playground import web_file
from fluxserve.app.errors import NotFound
from fluxserve.contract import MEDIA_TYPES

ERROR = {"$ref": "#/components/schemas/Error"}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "description": "Every error answer: what went wrong, in words",
    },
    "FailedResult": {
        "type": "object",
        "required": ["request_id", "status", "error"],
        "properties": {
            "request_id": {"type": "string"},
            "status": {"type": "string", "enum": ["FAILED"]},
            "error": {"type": "string"},
        },
        "description": "A request that ended FAILED (its error, e.g. cancelled, blocked, out of memory)",
    },
}
SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
               "description": "Needed while the server enforces API keys (as the segmind SDK sends it)"},
    "Bearer": {"type": "http", "scheme": "bearer", "description": "The same API key as `Authorization: Bearer`"},
}
# Either scheme, or none while the server does not ask for keys.
KEYED_SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}, {}]

MEANING = {
    400: "Invalid request: a parameter, header or the body (the error names it)",
    401: "Missing, unknown or revoked API key",
    403: "This key may not use the model, or the request belongs to another account",
    404: "Unknown, expired or removed",
    406: "Not enough credits",
    409: "Conflict: an Idempotency-Key reused with another body, or the request already ended",
    415: "The body is not declared application/json",
    421: "This server does not answer to that Host name (ALLOWED_HOSTS)",
    422: "The request ended FAILED: its result body, with the error",
    429: "Rate limit or jobs-in-flight limit reached; Retry-After says when to try again",
    500: "Internal error (the message carries a log reference)",
    502: "The model failed to load: generation is unavailable",
    503: "Not ready (the body names the failing check)",
    504: "v1 waited SYNC_TIMEOUT_SECONDS; the request goes on and can be polled",
}
EVERY_ROUTE = (421, 500)
# Each route's own error answers, by its endpoint's name.
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "generate_sync": (400, 401, 403, 404, 406, 409, 415, 422, 429, 502, 504),
    "generate_async": (400, 401, 403, 406, 409, 415, 429, 502),
    "request_status": (401, 403, 404, 422),
    "request_result": (401, 403, 404, 422),
    "request_events": (400, 401, 403, 404),
    "cancel_request": (401, 403, 404, 409, 415),
    "media": (401, 403, 404),
    "account": (401, 404),
    "webhook_secret": (401, 404),
    "health": (),
    "list_models": (),
    "get_model": (404,),
    "ready": (503,),
    "metrics": (),
}
ABOUT_ERRORS = (
    " Every error is `{\"error\": \"...\"}`; a wrong method answers 405 with `Allow`, and HEAD works wherever"
    " GET does. `POST /v1/images/generations` is OpenAI's Images API (request, answer and error shapes as"
    " OpenAI documents them), so it is not listed here."
)


def install_openapi(app: FastAPI) -> None:
    """Make the app's `openapi()` build (once) the post-processed document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description + ABOUT_ERRORS,
                                   routes=app.routes)
            app.openapi_schema = truthful(document, app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def truthful(document: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(SCHEMAS)
    components["securitySchemes"] = SECURITY_SCHEMES
    for route in all_routes(app):
        if not getattr(route, "include_in_schema", False) or route.path_format not in document["paths"]:
            continue
        for method in sorted(route.methods or ()):
            operation = document["paths"][route.path_format][method.lower()]
            errors = ROUTE_ERRORS.get(route.name, ())
            _document_errors(operation["responses"], (*errors, *EVERY_ROUTE))
            if 401 in errors:
                operation["security"] = KEYED_SECURITY
            _document_bodies(route.name, operation["responses"])
    return document


def all_routes(app: FastAPI) -> list[Any]:
    """Every route with its full path and methods, those of included routers too (newer FastAPI keeps
    included routers nested: `iter_route_contexts` flattens them; older ones list them flat)."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(app.routes)) if flatten else list(app.routes)


def _document_errors(responses: dict[str, Any], statuses: tuple[int, ...]) -> None:
    responses.pop("422", None)  # FastAPI's validation body; validation errors here are 400
    for status in sorted(statuses):
        schema = {"$ref": "#/components/schemas/FailedResult"} if status == 422 else ERROR
        answer: dict[str, Any] = {"description": MEANING[status], "content": {"application/json": {"schema": schema}}}
        if status == 429:
            answer["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
        responses[str(status)] = answer


def _document_bodies(name: str, responses: dict[str, Any]) -> None:
    """Success bodies FastAPI cannot see from the routes' signatures."""
    ok = responses.setdefault("200", {"description": "Successful Response"})
    if name == "generate_sync":
        ok["description"] = "The image; with `base64: true`, JSON: the result with the image in base64"
        ok.setdefault("content", {})["application/json"] = {"schema": {"type": "object"}}
    elif name == "metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif name == "media":
        ok["content"] = {media_type: {} for media_type in MEDIA_TYPES.values()}
        responses["206"] = {"description": "The asked Range of the image", "content": ok["content"]}
        responses["307"] = {"description": "Redirect to a pre-signed link (S3_PRESIGN_SECONDS)"}
        responses["416"] = {"description": "Range not satisfiable", "content": {"text/plain": {}}}


# -- /docs, offline ------------------------------------------------------------------------------

router = APIRouter(include_in_schema=False)

# Swagger UI's files, from the swagger-ui-bundle-v2 package (no CDN: /docs works offline).
SWAGGER_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                  "favicon-32x32.png": "image/png"}
_CACHED = {"Cache-Control": "public, max-age=86400"}


@functools.cache
def _swagger_file(name: str) -> bytes:
    return (swagger_ui_path / name).read_bytes()


@router.get("/docs", response_class=HTMLResponse)
async def docs() -> HTMLResponse:
    return HTMLResponse(web_file("docs.html"), headers={"Cache-Control": "no-cache"})


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> Response:
    if name == "docs.js":
        return Response(web_file(name), media_type="text/javascript", headers={"Cache-Control": "no-cache"})
    if name not in SWAGGER_ASSETS:
        raise NotFound("Not found")
    return Response(_swagger_file(name), media_type=SWAGGER_ASSETS[name], headers=_CACHED)
