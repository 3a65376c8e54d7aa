"""`POST /v1/images/generations`: OpenAI's Images API, on the same jobs as `/v1/{slug}` and `/v2/{slug}`.

The official `openai` client works with only its `base_url` changed. A request becomes `n` ordinary jobs
(the same queue, keys, credits, rate limits, moderation and idempotency as v2); the route waits for
them (like v1, at most `SYNC_TIMEOUT_SECONDS`) and answers OpenAI's shape:
`{"created", "data": [{"b64_json" | "url", "seed", "request_id"}], "size", "output_format", "model"}`.

Parameters (`null` means "not given", as the client sends it):
- OpenAI's: `prompt` (required), `model` (a served slug; the default model when left out), `n` (1-4),
  `size` (`WxH`, each side as the contract allows: 128-2048; `auto`: 1024x1024), `response_format`
  (`url`, the default: absolute media links, signed when a key made them; or `b64_json`),
  `output_format` (`png`, the default; `jpeg`, `webp`), `user`, and `quality`, `style`, `moderation`,
  `background` (not `transparent`), `output_compression`, `safety_identifier` (accepted, no effect).
  `stream: true` is refused (400): images come whole.
- Extensions (`extra_body=` in the client): `seed`, `steps`, `guidance` (the contract's `CFGScale`),
  `scheduler`, and `loras` where the server has registered LoRA adapters.

`n > 1` is `n` jobs with seeds `seed`, `seed+1`, ... (each charged as one image); without a `seed`
the first is drawn at random, or derived from the `Idempotency-Key` when one is sent, so a retry with
the key finds the same jobs. Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` on this
route only; errors after work started carry `x-should-retry: false`, so the client does not submit the
same images again.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from fluxserve.api.deps import CallerDep, ServicesDep, base_url, job_urls, read_body, write_lane
from fluxserve.api.errors import STATUS_OF, store_fault
from fluxserve.app.access import Caller
from fluxserve.app.body import decode_json
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
from fluxserve.app.submit import MAX_IDEMPOTENCY_KEY_LENGTH, SubmitHeaders
from fluxserve.contract import MAX_SEED, RANDOM_SEED, GenerateRequest, JobState
from fluxserve.jobs import Job
from fluxserve.logs import annotate
from fluxserve.services import Services

log = logging.getLogger(__name__)

MAX_N = 4
DEFAULT_SIZE = "1024x1024"
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPG", "jpg": "JPG", "webp": "WEBP"}
RESPONSE_FORMATS = ("url", "b64_json")
# OpenAI's parameters this server takes but that change nothing here.
ACCEPTED_NO_EFFECT = ("quality", "style", "user", "moderation", "output_compression", "safety_identifier",
                      "partial_images")
# The contract's name for each extension, where it differs.
EXTENSIONS = {"seed": "seed", "steps": "steps", "guidance": "CFGScale", "scheduler": "scheduler", "loras": "loras"}
KNOWN = {"prompt", "model", "n", "size", "response_format", "output_format", "background", "stream",
         *ACCEPTED_NO_EFFECT, *EXTENSIONS}
# The contract's field names as this route's callers know them (for error messages and `param`).
OPENAI_NAMES = {"positivePrompt": "prompt", "CFGScale": "guidance", "outputFormat": "output_format",
                "width": "size", "height": "size"}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_WAITERS = anyio.CapacityLimiter(1000)  # requests waiting for their images each hold a thread

# Status, OpenAI error `type` and `code` of each domain error; and whether a client may send it again.
OPENAI_ERRORS: dict[type[DomainError], tuple[int, str, str | None]] = {
    InvalidRequest: (400, "invalid_request_error", "invalid_value"),
    Unauthenticated: (401, "invalid_request_error", "invalid_api_key"),
    Forbidden: (403, "permission_error", "model_not_allowed"),
    NotFound: (404, "invalid_request_error", "not_found"),
    # OpenAI's answer for an account out of credits (a 429 the client must not retry).
    CreditsExhausted: (429, "insufficient_quota", "insufficient_quota"),
    Conflict: (409, "invalid_request_error", "idempotency_key_reused"),
    RateLimited: (429, "requests", "rate_limit_exceeded"),
    ModelUnavailable: (502, "server_error", "model_unavailable"),
    StillRunning: (504, "server_error", "timeout"),
    Unavailable: (503, "server_error", "service_unavailable"),
    OutOfSpace: (507, "server_error", "out_of_space"),
}
# Errors that retrying within seconds cannot fix (or that would make the same images again).
NO_RETRY = (CreditsExhausted, Conflict, ModelUnavailable, StillRunning, Forbidden)


class OpenAIError(Exception):
    """An error in OpenAI's terms: the status, and the body's `message`, `type`, `param` and `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: Mapping[str, str] | None = None, retry: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})
        if not retry:
            self.headers["x-should-retry"] = "false"

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def as_openai(exc: BaseException) -> OpenAIError | None:
    """The OpenAI answer for an error this route's code raised; None for an unexpected one (a 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return OpenAIError(400, f"Invalid request: {first['msg']}", code="invalid_value")
    fault = store_fault(exc) if not isinstance(exc, DomainError) else exc
    if not isinstance(fault, DomainError):
        return None
    status, kind, code = OPENAI_ERRORS.get(type(fault), (STATUS_OF.get(type(fault), 500), "server_error", None))
    message, param = _in_openai_words(fault.message) if isinstance(fault, InvalidRequest) else (fault.message, None)
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
    return OpenAIError(status, message, param=param, code=code, type_=kind, headers=headers,
                       retry=not isinstance(fault, NO_RETRY))


def _in_openai_words(message: str) -> tuple[str, str | None]:
    """A contract validation message with this route's parameter names, and the parameter it names."""
    for name, openai_name in OPENAI_NAMES.items():
        message = re.sub(rf"\b{name}\b", openai_name, message)
    match = re.match(r"^(?:Unknown field: )?([A-Za-z_]+)\b", message)
    param = match.group(1) if match and match.group(1) in KNOWN | {"loras"} else None
    return message, param


class OpenAIRoute(APIRoute):
    """Every error of the route (its dependencies' included) answered in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = as_openai(exc)
                if error is None:
                    ref = uuid.uuid4().hex[:12]
                    log.error("internal error ref=%s on %s %s", ref, request.method, request.url.path, exc_info=exc)
                    error = OpenAIError(500, f"Internal server error (ref {ref})", retry=False)
                elif error.status >= 500:
                    log.warning("%s %s answered %d: %s", request.method, request.url.path, error.status, error.message)
                if getattr(request.state, "work_started", False):
                    error.headers["x-should-retry"] = "false"
                return error.response()

        return answer


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])


@router.post("/v1/images/generations", include_in_schema=False)
async def openai_images(request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    """OpenAI's `images.generate`."""
    body = await read_body(request, services.settings.api.max_body_bytes)
    ask = parse(decode_json(body), services)
    base = base_url(request, services)
    idempotency_key = request.headers.get("idempotency-key")
    first_seed = ask.seed if ask.seed is not None else _default_seed(caller, idempotency_key)
    if first_seed + ask.n - 1 > MAX_SEED:
        raise OpenAIError(400, f"seed: at most {MAX_SEED - ask.n + 1} for n={ask.n}", param="seed",
                          code="invalid_value")
    jobs = await _submit_all(request, services, caller, ask, first_seed, idempotency_key, base)
    deadline = time.monotonic() + services.settings.api.sync_timeout_seconds
    images = []
    for job in jobs:
        done, data = await anyio.to_thread.run_sync(
            services.results.wait, job, max(0.0, deadline - time.monotonic()),
            job_urls(base, job.id)["status_url"], limiter=_WAITERS)
        if done.state is JobState.FAILED or data is None or done.result is None:
            raise _job_failed(done)
        image: dict[str, Any] = {"seed": done.params.seed, "request_id": done.id}
        if ask.response_format == "b64_json":
            image["b64_json"] = base64.b64encode(data).decode("ascii")
        else:
            image["url"] = services.results.body(done, base)["output"]
        images.append(image)
    body_out = {"created": int(time.time()), "data": images, "model": ask.model, "size": ask.size,
                "output_format": ask.output_format}
    return JSONResponse(body_out, headers={"x-request-id": jobs[0].id})


class Ask:
    """A validated request: the OpenAI parameters, and the contract fields each job gets."""

    def __init__(self, model: str, n: int, size: str, response_format: str, output_format: str,
                 seed: int | None, fields: dict[str, Any]) -> None:
        self.model = model
        self.n = n
        self.size = size
        self.response_format = response_format
        self.output_format = output_format
        self.seed = seed
        self.fields = fields


def parse(payload: object, services: Services) -> Ask:
    """The body, checked in OpenAI's terms (the contract checks the rest when each job is submitted)."""
    if not isinstance(payload, dict):
        raise OpenAIError(400, "The request body must be a JSON object", code="invalid_value")
    given = {name: value for name, value in payload.items() if value is not None}  # null: not given
    for name in given:
        if name not in KNOWN or (name == "loras" and "loras" not in GenerateRequest.model_fields):
            raise OpenAIError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    prompt = given.get("prompt")
    if prompt is None:
        raise OpenAIError(400, "Missing required parameter: 'prompt'.", param="prompt",
                          code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise OpenAIError(400, "prompt: must be a string", param="prompt", code="invalid_type")
    model = given.get("model", services.directory.default)
    if not isinstance(model, str) or model not in services.directory:
        raise OpenAIError(404, f"The model '{model}' does not exist; GET /v1/models lists the models served here "
                          f"({', '.join(services.directory.slugs)})", param="model", code="model_not_found")
    if given.get("stream") is True:
        raise OpenAIError(400, "streaming not supported", param="stream", code="unsupported_parameter")
    if given.get("background") == "transparent":
        raise OpenAIError(400, "background: transparent images are not supported", param="background",
                          code="unsupported_value")
    n = given.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise OpenAIError(400, f"n: must be an integer from 1 to {MAX_N}", param="n", code="invalid_value")
    size = given.get("size", "auto")
    width, height = _size("1024x1024" if size == "auto" else size)
    response_format = given.get("response_format", "url")
    if response_format not in RESPONSE_FORMATS:
        raise OpenAIError(400, f"response_format: must be one of {', '.join(RESPONSE_FORMATS)}",
                          param="response_format", code="invalid_value")
    output_format = given.get("output_format", "png")
    if not isinstance(output_format, str) or output_format.lower() not in OUTPUT_FORMATS:
        raise OpenAIError(400, "output_format: must be one of png, jpeg, webp", param="output_format",
                          code="invalid_value")
    seed = given.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not RANDOM_SEED <= seed <= MAX_SEED):
        raise OpenAIError(400, f"seed: must be an integer from 0 to {MAX_SEED} (-1: random)", param="seed",
                          code="invalid_value")
    fields: dict[str, Any] = {"positivePrompt": prompt, "width": width, "height": height,
                              "outputFormat": OUTPUT_FORMATS[output_format.lower()]}
    for name, field in EXTENSIONS.items():
        if name != "seed" and name in given:
            fields[field] = given[name]
    named = {"PNG": "png", "JPG": "jpeg", "WEBP": "webp"}[fields["outputFormat"]]  # OpenAI's name for it
    return Ask(model, n, f"{width}x{height}", response_format, named, None if seed in (None, RANDOM_SEED) else seed,
               fields)


def _size(size: object) -> tuple[int, int]:
    low, high = _side_limits()
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match:
        width, height = int(match.group(1)), int(match.group(2))
        if low <= width <= high and low <= height <= high:
            return width, height
    raise OpenAIError(400, f"size {size!r} is not supported: give WIDTHxHEIGHT, each from {low} to {high} "
                      f"(e.g. {DEFAULT_SIZE}), or auto", param="size", code="invalid_value")


@functools.cache
def _side_limits() -> tuple[int, int]:
    """The contract's bounds for width and height."""
    low, high = 1, 1 << 16
    for rule in GenerateRequest.model_fields["width"].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high


def _default_seed(caller: Caller, idempotency_key: str | None) -> int:
    """A random seed; one derived from the Idempotency-Key when there is one (a retry draws the same)."""
    if idempotency_key is None:
        return secrets.randbelow(2**32)
    digest = hashlib.sha256(f"{caller.account_id}:{idempotency_key}".encode()).hexdigest()
    return int(digest, 16) % 2**32


def _job_key(key: str | None, index: int, n: int) -> str | None:
    """The Idempotency-Key of the request's `index`-th job (the key itself when there is one job)."""
    if key is None or n == 1:
        return key
    suffix = f"#{index + 1}/{n}"
    if len(key) + len(suffix) > MAX_IDEMPOTENCY_KEY_LENGTH:
        key = hashlib.sha256(key.encode()).hexdigest()
    return key + suffix


async def _submit_all(request: Request, services: Services, caller: Caller, ask: Ask, first_seed: int,
                      idempotency_key: str | None, base: str) -> list[Job]:
    """Submit the request's jobs, one per image. When one cannot be submitted, those before it are cancelled
    (without an Idempotency-Key: with one, a retry finds and completes them)."""
    submit = functools.partial(services.submitter.submit, slug=ask.model)
    jobs: list[Job] = []
    try:
        for index in range(ask.n):
            body = json.dumps({**ask.fields, "seed": first_seed + index}).encode()
            headers = SubmitHeaders(_job_key(idempotency_key, index, ask.n), None)
            jobs.append(await write_lane(request).run(submit, caller, body, headers, base))
            request.state.work_started = True
            annotate(job_id=jobs[0].id)
    except Exception:
        if idempotency_key is None:
            for job in jobs:
                await anyio.to_thread.run_sync(_cancel_quietly, services, caller, job)
        raise
    return jobs


def _cancel_quietly(services: Services, caller: Caller, job: Job) -> None:
    try:
        services.control.cancel(caller, job.id)
    except Exception as exc:  # it runs, and is charged, like any job
        log.warning("could not cancel job %s of a failed images request (%s: %s)", job.id, type(exc).__name__, exc)


def _job_failed(job: Job) -> OpenAIError:
    error = job.error or "Generation failed"
    if "blocked by content policy" in error:
        return OpenAIError(400, error, param="prompt", code="content_policy_violation", retry=False)
    return OpenAIError(500, f"{error} (request {job.id})", code="generation_failed", retry=False)
