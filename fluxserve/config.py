"""The service's settings, in groups: env `FLUXSERVE_*` (flat names, as documented), CLI flags override.

Each group is a small model that the module it configures takes on its own (the engine gets
`ModelSettings` and `SpeedSettings`, the webhook sender `WebhookSettings`, ...). The environment
keeps its flat names: a group field's env name is `FLUXSERVE_` + the group's prefix + the field name
(`webhooks.secret` ← `FLUXSERVE_WEBHOOK_SECRET`), or the name it lists in `flat_names`
(`store.url` ← `FLUXSERVE_STORE`). The same flat names work as keyword arguments
(`Settings(webhook_allow_private=True)`), which is how the CLI passes its flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
ENV_PREFIX = "FLUXSERVE_"


class Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    env_prefix: ClassVar[str] = ""
    # Fields whose flat name is not `env_prefix + field name`.
    flat_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def flat_name(cls, field: str) -> str:
        return cls.flat_names.get(field, cls.env_prefix + field)


class ModelSettings(Group):
    """What to load and how to place it in memory (fluxserve/engine)."""

    # A Hugging Face repo id, a diffusers folder, or a single-file transformer checkpoint.
    # Unset: the tiny random-weight demo model is built under data_dir and served (loudly).
    model: str | None = None
    # Where the other components come from when `model` is a single-file transformer checkpoint.
    base_model: str = DEFAULT_BASE_MODEL
    slug: str = "juggernaut-pro-flux"
    # Its workers are started on demand (an autoscaler such as KEDA scales them from zero on the queue):
    # a submit queues even while no worker serves the model, instead of answering 503.
    on_demand: bool = False
    device: str | None = None  # cuda if available, else cpu
    dtype: str | None = None  # bfloat16 on GPU, float32 on CPU
    max_sequence_length: int = Field(512, ge=1, le=512)
    # LoRA adapters fused at start-up: comma-separated LOCATION[:SCALE] (.safetensors file, folder or repo id).
    loras: str = ""
    # Per-request LoRAs (a request's `loras`): each *.safetensors file here, or subfolder holding one, is an
    # adapter named by its stem (folder name); read afresh on each look-up.
    lora_dir: Path | None = None
    lora_cache_size: int = Field(8, ge=1)  # per-request adapters kept loaded (least recently used evicted)
    # "model_cpu_offload" (a component at a time on the GPU) or "sequential_cpu_offload" (layer by layer).
    memory_mode: Literal["none", "model_cpu_offload", "sequential_cpu_offload"] = "none"
    vae_tiling: bool = False  # decode in tiles: 2048² images with little memory (pixels differ slightly)
    vae_slicing: bool = False  # decode a batch one image at a time


class SpeedSettings(Group):
    """Speed options (fluxserve/engine/speed.py). A preset picks the options; each switch set here
    overrides the preset (unset = the preset's choice). "auto": quality on CUDA, off elsewhere."""

    env_prefix: ClassVar[str] = "speed_"

    preset: Literal["auto", "off", "quality", "balanced", "turbo"] = "auto"
    bf16: bool | None = None
    fuse_qkv: bool | None = None
    # "auto" (the first that passes a start-up probe: FA3 on Hopper, cuDNN attention on Hopper/Ada, else
    # PyTorch SDPA), "default" (diffusers' own: SDPA) or any diffusers attention backend name (native,
    # _native_cudnn, flash, _flash_3, sage, ...).
    attention: str | None = None
    channels_last_vae: bool | None = None
    compile: bool | None = None
    fp8: bool | None = None
    step_cache: bool | None = None
    # torch.compile: static shapes by default (one graph per size, compiled once, kept on disk);
    # dynamic=true compiles one graph for every size (no compile for a new size; slower kernels).
    compile_mode: str | None = None  # max-autotune-no-cudagraphs on CUDA, default on CPU
    compile_dynamic: bool = False
    compile_cache_dir: Path | None = None  # data_dir/compile-cache when unset
    # Compiled at start-up, "WxH,WxH"; only these sizes run compiled, any other size runs uncompiled
    # (nothing compiles on a request). Empty: nothing is compiled.
    warmup_sizes: str = "1024x1024"
    # Dynamo's cache entries per block class; raised to fit the warm-up sizes (two entries each).
    compile_recompile_limit: int = Field(64, ge=1)
    # First-block cache: a step reuses the previous step's residual when the first block's output
    # moved by less than this (relative mean absolute change). Higher: faster, lower quality.
    step_cache_threshold: float = Field(0.12, gt=0, le=1)
    # VAE tiling for large images, decided per request: when the decode would not fit in free GPU
    # memory, or from this many pixels on (unset: by memory only).
    auto_vae_tiling: bool = True
    vae_tiling_min_pixels: int | None = Field(None, gt=0)
    # Latent previews (when the job asks for them) every this many steps, and at the last step.
    preview_every: int = Field(4, ge=1)


class StoreSettings(Group):
    """The job store every API process and worker shares, and its lease and retention rules."""

    flat_names: ClassVar[dict[str, str]] = {"url": "store"}

    # sqlite:///path | redis://host:port/db | postgresql://user@host/db; unset: the SQLite file under
    # data_dir. Redis and PostgreSQL hold everything a fleet shares: jobs, outbox, accounts, secrets, media.
    url: str | None = None
    # Key prefix in Redis (every store on it), so several deployments can share one server.
    redis_prefix: str = "fluxserve"
    retention_seconds: float = Field(3600.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # A job whose worker died is claimable again this long after its lease lapsed, doubled per attempt.
    reclaim_backoff_seconds: float = Field(30.0, ge=0)
    janitor_interval_seconds: float = Field(30.0, gt=0)


class OutputSettings(Group):
    """Where images go: unset = files under data_dir; `redis://...`; `s3://bucket/prefix` (S3-compatible)."""

    flat_names: ClassVar[dict[str, str]] = {"url": "output_store"}

    url: str | None = None
    s3_endpoint_url: str | None = None  # e.g. a MinIO URL; unset = AWS
    s3_region: str | None = None
    s3_presign_seconds: int = Field(0, ge=0)  # > 0: media URLs redirect to pre-signed links


class ApiSettings(Group):
    """The HTTP API's own limits."""

    sync_timeout_seconds: float = Field(600.0, gt=0)  # how long v1 waits for its image
    max_body_bytes: int = Field(64 * 1024, gt=0)
    # Host headers answered (comma-separated names, `name:port`, or `*` for any); others get 421.
    # Empty: while keys are off, the bind address, loopback names and PUBLIC_URL's host; with keys, any.
    allowed_hosts: str = ""
    # Browser origins allowed to call the API from their pages (comma-separated, `*` for any); empty: CORS off.
    cors_origins: str = ""


class WorkerSettings(Group):
    """The worker: embedded in the API process by default, or `fluxserve worker` on its own."""

    env_prefix: ClassVar[str] = "worker_"
    flat_names: ClassVar[dict[str, str]] = {"embedded": "worker", "previews": "previews"}

    embedded: bool = True  # run a worker inside the API process
    concurrency: int = Field(1, ge=1)  # jobs one worker process runs side by side
    models: str | None = None  # comma-separated slugs this worker loads and claims; unset = every served model
    previews: bool = True  # low-resolution latent previews in progress reports
    # A worker advertises the models it serves in the shared store, renewed every third of this; an
    # advert not renewed within it lapses (the API then answers 503 for a model no live worker serves).
    presence_seconds: float = Field(15.0, gt=0)


class WebhookSettings(Group):
    env_prefix: ClassVar[str] = "webhook_"

    # The Standard Webhooks signing secret (whsec_…); unset: made once in the accounts store, shared by the fleet.
    secret: str | None = None
    default_url: str | None = None  # for requests that name no webhook
    # Allow loopback/private/link-local webhook targets (off: such targets are refused, against SSRF).
    allow_private: bool = False
    timeout_seconds: float = Field(10.0, gt=0)
    backoff_seconds: float = Field(1.0, gt=0)  # first retry delay, doubled after each failure
    max_backoff_seconds: float = Field(120.0, gt=0)
    max_age_seconds: float = Field(900.0, gt=0)  # stop retrying this long after the first attempt
    senders: int = Field(4, ge=1)
    poll_seconds: float = Field(0.5, gt=0)


class AccountSettings(Group):
    """API keys, credits and rate limits (fluxserve/accounts/)."""

    flat_names: ClassVar[dict[str, str]] = {"store_url": "accounts_store"}

    # auto: keys are required once any key exists or the bind is not loopback; off: never (logged).
    auth: Literal["required", "off", "auto"] = "auto"
    # Secret for key digests and signed media links; unset: made once in the accounts store, shared by the fleet.
    auth_secret: str | None = None
    store_url: str | None = None  # sqlite:///path | redis://... | postgresql://...; unset: the job store
    # The price of one image in credits: per image, plus per megapixel per step (0 makes it free).
    price_per_image: float = Field(1.0, ge=0)
    price_per_megapixel_step: float = Field(0.0, ge=0)


class ModerationSettings(Group):
    """Prompt policy (on by default, with the built-in blocklist) and an optional image classifier."""

    env_prefix: ClassVar[str] = "moderation_"
    flat_names: ClassVar[dict[str, str]] = {"enabled": "moderation"}

    enabled: bool = True
    blocklist: Path | None = None  # a blocklist file used instead of the built-in one
    categories: str = ""  # comma-separated categories to enforce; empty: all in the blocklist
    image_classifier: str | None = None  # an image-classification model (repo id or folder)
    image_labels: str = "nsfw"  # comma-separated classifier labels that block an image
    image_threshold: float = Field(0.5, ge=0, le=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".fluxserve")
    # Public base URL for status/response/media links; the request's own host when unset.
    public_url: str | None = None
    log_format: str = Field("json", pattern="^(json|text)$")
    log_level: str = "INFO"
    # More models beside (or instead of) `model`: comma-separated SLUG=LOCATION, and/or a TOML file with
    # per-model options (fluxserve/catalog.py).
    models: str = ""
    models_file: Path | None = None

    model: ModelSettings = ModelSettings()
    speed: SpeedSettings = SpeedSettings()
    store: StoreSettings = StoreSettings()
    outputs: OutputSettings = OutputSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    webhooks: WebhookSettings = WebhookSettings()
    accounts: AccountSettings = AccountSettings()
    moderation: ModerationSettings = ModerationSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_Grouped(settings_cls, init_settings), _Grouped(settings_cls, FlatEnv(settings_cls)))

    def with_overrides(self, **flat: Any) -> Settings:
        """A copy with flat-named values replaced (None values are ignored)."""
        grouped = group_flat({name: value for name, value in flat.items() if value is not None})
        data = self.model_dump()
        for name, value in grouped.items():
            data[name] = {**data[name], **value} if isinstance(value, dict) else value
        return Settings.model_validate(data)

    @property
    def worker_slugs(self) -> list[str]:
        """The slugs a worker of this process serves: `worker.models`, else every served model."""
        from fluxserve.catalog import model_table, worker_slugs

        return worker_slugs(self, model_table(self))

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def tiny_model_dir(self) -> Path:
        return self.data_dir / "tiny-model"

    @property
    def compile_cache_dir(self) -> Path:
        return self.speed.compile_cache_dir or self.data_dir / "compile-cache"


def _groups() -> dict[str, type[Group]]:
    return {
        name: info.annotation
        for name, info in Settings.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, Group)
    }


def flat_fields() -> dict[str, tuple[str | None, str]]:
    """Every flat name → (group or None for a top-level field, field name)."""
    table: dict[str, tuple[str | None, str]] = {}
    groups = _groups()
    for name in Settings.model_fields:
        if name not in groups:
            table[name] = (None, name)
    for group_name, group in groups.items():
        for field in group.model_fields:
            table[group.flat_name(field)] = (group_name, field)
    return table


def group_flat(values: dict[str, Any]) -> dict[str, Any]:
    """Flat names → nested group dicts; a group given whole (object or dict) passes through."""
    table, groups = flat_fields(), _groups()
    grouped: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Group) or (name in groups and isinstance(value, dict)):
            grouped[name] = value.model_dump() if isinstance(value, Group) else value
            continue
        if name not in table:
            raise ValueError(f"Unknown setting {name!r}")
        group, field = table[name]
        if group is None:
            grouped[field] = value
        else:
            grouped.setdefault(group, {})[field] = value
    return grouped


class FlatEnv(PydanticBaseSettingsSource):
    """`FLUXSERVE_<flat name>` environment variables (case-insensitive), as strings."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every variable at once

    def __call__(self) -> dict[str, Any]:
        known = flat_fields()
        found = {}
        for key, value in os.environ.items():
            name = key.upper().removeprefix(ENV_PREFIX).lower()
            if key.upper().startswith(ENV_PREFIX) and name in known:
                found[name] = value
        return found


class _Grouped(PydanticBaseSettingsSource):
    """Another source's flat names, nested into their groups (so sources merge field by field)."""

    def __init__(self, settings_cls: type[BaseSettings], source: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        return group_flat(self.source())
