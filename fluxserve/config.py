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
