"""One Settings object for the whole service: env `FLUXSERVE_*`, CLI flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".fluxserve")
    # Public base URL for status/response/media links; the request's own host when unset.
    public_url: str | None = None

    # Model: a Hugging Face repo id, a diffusers folder, or a single-file transformer checkpoint.
    # Unset: the tiny random-weight demo model is built under data_dir and served (loudly).
    model: str | None = None
    # Where the other components come from when `model` is a single-file transformer checkpoint.
    base_model: str = DEFAULT_BASE_MODEL
    slug: str = "juggernaut-pro-flux"
    device: str | None = None  # cuda if available, else cpu
    dtype: str | None = None  # bfloat16 on GPU, float32 on CPU
    max_sequence_length: int = Field(512, ge=1, le=512)

    # Job store: a URL; unset means the SQLite file under data_dir.
    store: str | None = None
    retention_seconds: float = Field(3600.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    sync_timeout_seconds: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, gt=0)
    janitor_interval_seconds: float = Field(30.0, gt=0)

    # Run a worker inside the API process (the embedded default).
    worker: bool = True

    # Webhooks, cancel deadlines and progress previews.
    # The Standard Webhooks signing secret (whsec_…); unset: generated once into data_dir/webhook-secret.
    webhook_secret: str | None = None
    webhook_default_url: str | None = None  # for requests that name no webhook
    # Allow loopback/private/link-local webhook targets (off: such targets are refused, against SSRF).
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_backoff_seconds: float = Field(1.0, gt=0)  # first retry delay, doubled after each failure
    webhook_max_backoff_seconds: float = Field(120.0, gt=0)
    webhook_max_age_seconds: float = Field(900.0, gt=0)  # stop retrying this long after the first attempt
    webhook_senders: int = Field(4, ge=1)
    webhook_poll_seconds: float = Field(0.5, gt=0)
    previews: bool = True  # low-resolution latent previews in progress reports

    # Fleet: shared stores, separate API and worker processes, observability.
    # Key prefix in Redis (job store and output store), so several deployments can share one server.
    redis_prefix: str = "fluxserve"
    # Output media: unset = files under data_dir; `redis://...`; `s3://bucket/prefix` (S3-compatible).
    output_store: str | None = None
    s3_endpoint_url: str | None = None  # e.g. a MinIO URL; unset = AWS
    s3_region: str | None = None
    s3_presign_seconds: int = Field(0, ge=0)  # > 0: media URLs redirect to pre-signed links
    worker_concurrency: int = Field(1, ge=1)  # jobs one worker process runs side by side
    worker_models: str | None = None  # comma-separated slugs this worker claims; unset = `slug`
    log_format: str = Field("json", pattern="^(json|text)$")
    log_level: str = "INFO"

    @property
    def worker_slugs(self) -> list[str]:
        return [s.strip() for s in (self.worker_models or self.slug).split(",") if s.strip()]

    # Speed options (fluxserve/engine/speed.py). A preset picks the options; each switch set here
    # overrides the preset (unset = the preset's choice). "auto": quality on CUDA, off elsewhere.
    speed_preset: Literal["auto", "off", "quality", "balanced", "turbo"] = "auto"
    speed_bf16: bool | None = None
    speed_fuse_qkv: bool | None = None
    # "auto" (the fastest installed: FA3, flash-attn, PyTorch SDPA), "default" (diffusers' own: SDPA)
    # or any diffusers attention backend name (native, _native_cudnn, flash, _flash_3, sage, ...).
    speed_attention: str | None = None
    speed_channels_last_vae: bool | None = None
    speed_compile: bool | None = None
    speed_fp8: bool | None = None
    speed_step_cache: bool | None = None
    # torch.compile: static shapes by default (one graph per size, compiled once, kept on disk);
    # dynamic=true compiles one graph for every size (no compile for a new size; slower kernels).
    speed_compile_mode: str | None = None  # max-autotune-no-cudagraphs on CUDA, default on CPU
    speed_compile_dynamic: bool = False
    speed_compile_cache_dir: Path | None = None  # data_dir/compile-cache when unset
    speed_warmup_sizes: str = "1024x1024"  # compiled at start-up: "WxH,WxH"; empty for none
    # First-block cache: a step reuses the previous step's residual when the first block's output
    # moved by less than this (relative mean absolute change). Higher: faster, lower quality.
    speed_step_cache_threshold: float = Field(0.12, gt=0, le=1)
    # VAE tiling for large images, decided per request: when the decode would not fit in free GPU
    # memory, or from this many pixels on (unset: by memory only).
    speed_auto_vae_tiling: bool = True
    speed_vae_tiling_min_pixels: int | None = Field(None, gt=0)

    # Fault injection for tests and drills, e.g. "engine_error_on=<substring of a prompt>". Off by default.
    faults: str = ""

    # Accounts: API keys, credits and rate limits (fluxserve/accounts/).
    # auto: keys are required once any key exists or the bind is not loopback; off: never (logged).
    auth: Literal["required", "off", "auto"] = "auto"
    # Secret for key digests and signed media links; unset: made once into data_dir/auth-secret.
    auth_secret: str | None = None
    # Where accounts live (sqlite:///path); unset: the jobs' SQLite file.
    accounts_store: str | None = None
    # The price of one image in credits: per image, plus per megapixel per step (0 makes it free).
    price_per_image: float = Field(1.0, ge=0)
    price_per_megapixel_step: float = Field(0.0, ge=0)

    # Engine fidelity: LoRA adapters, memory modes for smaller GPUs, content moderation.
    # LoRA adapters fused at start-up: comma-separated LOCATION[:SCALE] (.safetensors file, folder or repo id).
    loras: str = ""
    # "model_cpu_offload" (a component at a time on the GPU) or "sequential_cpu_offload" (layer by layer).
    memory_mode: Literal["none", "model_cpu_offload", "sequential_cpu_offload"] = "none"
    vae_tiling: bool = False  # decode in tiles: 2048² images with little memory (pixels differ slightly)
    vae_slicing: bool = False  # decode a batch one image at a time
    # Prompt policy (on by default, with the built-in blocklist) and an optional image classifier.
    moderation: bool = True
    moderation_blocklist: Path | None = None  # a blocklist file used instead of the built-in one
    moderation_categories: str = ""  # comma-separated categories to enforce; empty: all in the blocklist
    moderation_image_classifier: str | None = None  # an image-classification model (repo id or folder)
    moderation_image_labels: str = "nsfw"  # comma-separated classifier labels that block an image
    moderation_image_threshold: float = Field(0.5, ge=0, le=1)

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
        return self.speed_compile_cache_dir or self.data_dir / "compile-cache"
