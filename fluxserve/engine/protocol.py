"""What the worker asks of an engine: one image for one set of parameters, with progress hooks.

The real FLUX engine (`fluxserve.engine.FluxEngine`) and the queue-only fake (`fluxserve.engine.fake`)
both satisfy `Engine`; `tests/test_engine_protocol.py` runs a job through the worker on each, so
neither can drift from what the worker calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL.Image import Image

# After each denoising step: (steps done, steps in all). Raising GenerationCancelled stops the run.
ProgressCallback = Callable[[int, int], None]
# A small, cheaply decoded picture of the current latent, just before some progress calls (every Nth
# step and the last; the engine's settings choose N). It may also have a `watched() -> bool` method: on a
# step that would get a preview the engine asks it first, and when it answers False makes none (no copy
# of the latent, no picture), since nobody would see it. A plain callable is always watched.
PreviewCallback = Callable[[Image], None]


def preview_watched(on_preview: PreviewCallback) -> bool:
    """Whether to make a preview now for `on_preview` (see PreviewCallback)."""
    watched = getattr(on_preview, "watched", None)
    return watched is None or bool(watched())


class GenerationCancelled(Exception):
    """Raised from inside the denoising loop when the caller asks to stop."""


@dataclass(frozen=True)
class LoraWeight:
    """One per-request LoRA adapter: a name from the operator's registry, and its scale (0: no effect)."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationParams:
    """An engine's parameters (the contract's request maps onto them in one place:
    `GenerateRequest.generation_params`)."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    guidance: float
    scheduler: str = "Euler"
    # Per-request LoRA adapters (fluxserve/engine/lora.py); the queue-only fake engine ignores them.
    loras: tuple[LoraWeight, ...] = ()


@runtime_checkable
class Engine(Protocol):
    # What is loaded, for logs and /health.
    description: str

    def generate(
        self,
        params: GenerationParams,
        on_step: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> Image:
        """One image of exactly params.width × params.height; the same params give the same pixels."""
        ...

    def metrics(self) -> dict[str, Any]:
        """What the engine adds to every job's metrics (e.g. the speed preset and options in use)."""
        ...
