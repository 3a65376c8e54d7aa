"""Memory modes for smaller GPUs, chosen in config (`memory_mode`, `vae_tiling`, `vae_slicing`).

- `none`: the whole pipeline lives on the device (fastest; FLUX.1-dev's weights are ~34 GB in bf16).
- `model_cpu_offload`: each component (text encoders, transformer, VAE) moves to the GPU only while
  it runs (diffusers' `enable_model_cpu_offload`): the largest one, the 24 GB transformer, sets the peak.
- `sequential_cpu_offload`: weights stream to the GPU layer by layer (`enable_sequential_cpu_offload`):
  least memory, much slower.
- VAE tiling decodes large images (2048²) in overlapping tiles; slicing decodes a batch one image
  at a time. Tiling changes pixels slightly (tiles are blended), so it is off by default.

`prepare_pipeline` is the one call `load_engine` makes: LoRA fusing first, then the memory mode.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from fluxserve.config import ModelSettings
from fluxserve.engine.lora import fuse_loras

log = logging.getLogger(__name__)

def load_device(config: ModelSettings, device: str) -> str:
    """Where to load the weights: offloading starts from the CPU (never load the whole model on the GPU)."""
    return "cpu" if config.memory_mode != "none" else device


def apply_memory_mode(pipe: Any, config: ModelSettings, device: str) -> None:
    """Install the configured offloading and VAE options on a loaded (and LoRA-fused) pipeline."""
    if config.memory_mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif config.memory_mode == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    if config.vae_slicing:
        pipe.vae.enable_slicing()
    if config.memory_mode != "none" or config.vae_tiling or config.vae_slicing:
        log.info("memory mode %s (vae tiling %s, slicing %s)", config.memory_mode, config.vae_tiling,
                 config.vae_slicing)


def after_generation(pipe: Any) -> None:
    """Each job runs on a per-job copy of the pipeline; offloaded models go back to the CPU here."""
    if getattr(pipe, "_all_hooks", None):
        pipe.maybe_free_model_hooks()


def release_memory() -> None:
    """After an out-of-memory error: drop what the failed run held, so the next job starts clean."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_pipeline(pipe: Any, config: ModelSettings, device: str) -> None:
    """After loading: fuse the configured LoRAs (on the load device), then install the memory mode."""
    fuse_loras(pipe, config.loras)
    apply_memory_mode(pipe, config, device)
