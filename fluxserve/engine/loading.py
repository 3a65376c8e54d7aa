"""Loading a FLUX pipeline from what a user has: a hub repo id, a diffusers folder, or one file.

- A diffusers folder (has `model_index.json`) or a Hugging Face repo id: `FluxPipeline.from_pretrained`.
- A single-file transformer checkpoint (`.safetensors`, original BFL layout or diffusers layout, as
  fine-tunes such as Juggernaut Pro Flux are shipped): diffusers' single-file loader builds the
  transformer with the base model's config, the other components come from the base repo/folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder" | "single_file" | "repo"
    location: str
    base: str | None = None

    @classmethod
    def parse(cls, model: str, base_model: str) -> ModelSource:
        path = Path(model).expanduser()
        if path.suffix in (".safetensors", ".sft") or model.startswith(("http://", "https://")):
            if not model.startswith(("http://", "https://")) and not path.is_file():
                raise ModelLoadError(f"Single-file checkpoint not found: {model}")
            return cls("single_file", str(path) if path.is_file() else model, base=base_model)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
            return cls("folder", str(path))
        if path.exists() or model.startswith((".", "/", "~")):
            raise ModelLoadError(f"Model path not usable: {model}")
        return cls("repo", model)


def resolve_device_and_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise ModelLoadError(f"Unknown dtype {dtype!r} (try bfloat16, float16 or float32)") from None
    return device, torch_dtype


def load_pipeline(source: ModelSource, *, device: str, dtype):
    """Load a FluxPipeline onto `device`; a clear ModelLoadError when the weights are not reachable."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    log.info("loading %s model %s (device=%s, dtype=%s)", source.kind, source.location, device, dtype)
    try:
        if source.kind == "single_file":
            transformer = FluxTransformer2DModel.from_single_file(
                source.location, config=source.base, subfolder="transformer", torch_dtype=dtype
            )
            pipe = FluxPipeline.from_pretrained(source.base, transformer=transformer, torch_dtype=dtype)
        else:
            pipe = FluxPipeline.from_pretrained(source.location, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {source.location!r}"
            + (f" (base {source.base!r})" if source.base else "")
            + f": {exc}. Point FLUXSERVE_MODEL at a diffusers folder, a single .safetensors transformer "
            "checkpoint (with FLUXSERVE_BASE_MODEL for the other components), or a Hugging Face repo id "
            "that is downloadable or already in the local cache."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
