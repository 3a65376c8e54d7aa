"""LoRA adapters, fused into the model's weights once at start-up (setting `loras`).

`loras` is a comma-separated list of `LOCATION[:SCALE]`; LOCATION is a `.safetensors` file, a folder
holding one, or a Hugging Face repo id; SCALE defaults to 1. After fusing, the adapter layers are
unloaded: the model is a plain FLUX model again, so generation runs at full speed, and a scale of 0
leaves the weights exactly as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fluxserve.engine.loading import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    location: str
    scale: float = 1.0


def parse_loras(spec: str) -> list[LoraSpec]:
    loras = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        location, _, scale = item.rpartition(":")
        try:
            loras.append(LoraSpec(location.strip(), float(scale)) if location else LoraSpec(item))
        except ValueError:  # no scale; the colon belongs to the location
            loras.append(LoraSpec(item))
    return loras


def fuse_loras(pipe, spec: str) -> None:
    """Load every adapter in `spec`, fuse them with their scales, and drop the adapter layers."""
    loras = parse_loras(spec)
    if not loras:
        return
    names = [f"lora_{index}" for index in range(len(loras))]
    for name, lora in zip(names, loras, strict=False):
        log.info("loading LoRA %s (scale %g)", lora.location, lora.scale)
        try:
            pipe.load_lora_weights(lora.location, adapter_name=name)
        except Exception as exc:  # diffusers raises OSError, ValueError, KeyError… for a bad adapter
            raise ModelLoadError(
                f"Could not load LoRA {lora.location!r}: {type(exc).__name__}: {exc}. FLUXSERVE_LORAS takes "
                "comma-separated LOCATION[:SCALE] entries (a .safetensors file, a folder or a repo id) "
                "made for this model's architecture."
            ) from exc
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    log.info("fused %d LoRA adapter(s)", len(loras))
