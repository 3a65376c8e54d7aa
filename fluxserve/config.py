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

    # Fault injection for tests and drills, e.g. "engine_error_on=<substring of a prompt>". Off by default.
    faults: str = ""

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
