"""The public contract: the hosted API's request parameters, states and error body.

Names, types, ranges and defaults are exactly those of the Juggernaut Pro Flux page. Everything the
API accepts from a client passes through `GenerateRequest`; everything it says back about a job uses
the four `JobState`s.
"""

from __future__ import annotations

import enum
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from fluxserve.engine.protocol import GenerationParams, LoraWeight
from fluxserve.engine.schedulers import SCHEDULER_NAMES, SCHEDULERS, scheduler_docs

DEFAULT_PROMPT = (
    "Middle-aged man sitting alone at diner counter, 3am, half-eaten pie, reflection in window, "
    "fluorescent lighting casting shadows."
)
DEFAULT_SEED = 1184522
RANDOM_SEED = -1
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000

OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
MEDIA_TYPES = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED)


# CFGScale: the page says integer 0-30; FLUX's distilled guidance is commonly fractional (3.5), so a
# JSON number in range is accepted too. A string or a boolean is still a type error.
Guidance = Annotated[StrictInt | float, Field(ge=0, le=30)]
Side = Annotated[StrictInt, Field(ge=128, le=2048)]

# Per-request LoRA adapters (this server's addition to the page's parameters; the same limits as
# fluxserve/engine/lora.py, which does not import here: the API process never loads the engine).
MAX_LORAS = 3
LORA_SCALE_MIN, LORA_SCALE_MAX = -2.0, 2.0
MAX_LORA_NAME_CHARS = 200


class LoraChoice(BaseModel):
    """One adapter for this request: a name the server registered (GET /v1/loras), and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=MAX_LORA_NAME_CHARS,
                               description="A registered LoRA's name (GET /v1/loras lists them)")]
    scale: Annotated[
        StrictInt | float,
        Field(ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX, description="How strongly it applies; 0: as without it"),
    ] = 1.0


class GenerateRequest(BaseModel):
    """The page's eight parameters, plus `base64` (the hosted API's switch for a JSON/base64 answer) and
    `loras` (per-request LoRA adapters, this server's own)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    positivePrompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    width: Side = 1024
    height: Side = 1024
    steps: Annotated[StrictInt, Field(ge=1, le=100)] = 25
    seed: Annotated[StrictInt, Field(ge=RANDOM_SEED, le=MAX_SEED)] = DEFAULT_SEED
    CFGScale: Guidance = 7
    outputFormat: Literal["JPG", "PNG", "WEBP"] = "JPG"
    scheduler: Annotated[
        str, Field(description=scheduler_docs(), json_schema_extra={"enum": list(SCHEDULER_NAMES)})
    ] = "Euler"
    base64: StrictBool = False
    loras: Annotated[
        list[LoraChoice],
        Field(max_length=MAX_LORAS, description=f"Up to {MAX_LORAS} of the server's LoRA adapters, each by name "
                                                "with a scale; applied to this request only"),
    ] = []

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if not self.positivePrompt.strip():
            raise ValueError("positivePrompt must not be empty")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler {self.scheduler!r} is not one of: " + ", ".join(SCHEDULER_NAMES)
            )
        names = [lora.name for lora in self.loras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError("loras: each LoRA may be listed once; repeated: " + ", ".join(map(repr, repeated)))
        return self

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """pydantic's schema with nested models written in place (no `$defs`): it is embedded as is in the
        OpenAPI document and in /v1/models, where a `#/$defs/...` reference would not resolve."""
        return inline_refs(super().model_json_schema(*args, **kwargs))

    def lora_weights(self) -> tuple[LoraWeight, ...]:
        """The request's adapters (also for a stored job, whose `loras` are read back as plain dicts)."""
        weights = []
        for lora in self.loras or ():
            if isinstance(lora, dict):
                weights.append(LoraWeight(str(lora["name"]), float(lora.get("scale", 1.0))))
            else:
                weights.append(LoraWeight(lora.name, float(lora.scale)))
        return tuple(weights)

    def generation_params(self) -> GenerationParams:
        """The engine's parameters for this request (the one place the contract's names map onto them)."""
        return GenerationParams(
            prompt=self.positivePrompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            seed=self.seed,
            guidance=float(self.CFGScale),
            scheduler=self.scheduler,
            loras=self.lora_weights(),
        )

    def with_resolved_seed(self) -> GenerateRequest:
        """Replace `seed: -1` by a concrete random seed, so a retried job draws the same image."""
        if self.seed != RANDOM_SEED:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(2**32)})


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with each `{"$ref": "#/$defs/Name"}` replaced by that definition (no recursive models)."""
    definitions = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and len(node) == 1:
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


class RequestError(ValueError):
    """A client error with the message that goes into the `{"error": ...}` body."""


def parse_request(payload: object) -> GenerateRequest:
    """Validate a decoded JSON body; raise RequestError naming the offending field."""
    if not isinstance(payload, dict):
        raise RequestError("Request body must be a JSON object")
    try:
        return GenerateRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    messages = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            messages.append(f"Unknown field: {field}")
        elif err["type"] == "missing":
            messages.append(f"{field}: required")
        elif err["type"] == "value_error" and not field:
            messages.append(str(err["ctx"]["error"]))
        elif field:
            messages.append(f"{field}: {err['msg']}")
        else:
            messages.append(err["msg"])
    return "; ".join(messages)


def error_body(message: str) -> dict[str, str]:
    return {"error": message}
