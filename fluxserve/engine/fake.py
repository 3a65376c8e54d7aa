"""NOT a model: an engine that sleeps and returns a flat grey image, for measuring the queue alone.

Selected with `FLUXSERVE_MODEL=fake-sleep:SECONDS` (bench/load.py uses it). Its images carry no
content; the log says so when it loads. It satisfies `fluxserve.engine.protocol.Engine` like the real
engine does (tests/test_engine_protocol.py runs both through the worker).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PIL import Image

from fluxserve.engine.preview import PREVIEW_MAX_SIDE
from fluxserve.engine.protocol import GenerationParams, PreviewCallback, ProgressCallback, preview_watched

log = logging.getLogger(__name__)

PREFIX = "fake-sleep:"
GREY = (128, 128, 128)


class SleepingEngine:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.description = f"{PREFIX}{seconds:g} (fake engine: sleeps, no model)"

    @classmethod
    def from_spec(cls, spec: str) -> SleepingEngine:
        engine = cls(float(spec.removeprefix(PREFIX)))
        log.warning("FAKE ENGINE: %s; images are flat grey", engine.description)
        return engine

    def generate(
        self,
        params: GenerationParams,
        on_step: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> Image.Image:
        """Sleep `seconds` in all, spread over the steps; a flat grey image of exactly width×height."""
        for step in range(params.steps):
            time.sleep(self.seconds / params.steps)
            if on_preview is not None and preview_watched(on_preview):  # as the real engine: none unwatched
                on_preview(Image.new("RGB", preview_size(params.width, params.height), GREY))
            if on_step is not None:
                on_step(step + 1, params.steps)
        return Image.new("RGB", (params.width, params.height), GREY)

    def metrics(self) -> dict[str, Any]:
        # Marks every job it ran, so fake figures are never mistaken for a model's.
        return {"engine": "fake-sleep"}


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The image's aspect ratio at most PREVIEW_MAX_SIDE a side, as the real engine's previews."""
    scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))
