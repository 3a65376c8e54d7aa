"""NOT a model: an engine that sleeps and returns a flat grey image, for measuring the queue alone.

Selected with `FLUXSERVE_MODEL=fake-sleep:SECONDS` (bench/load.py uses it). Its images carry no
content; the log says so when it loads.
"""

from __future__ import annotations

import logging
import time

from PIL import Image

log = logging.getLogger(__name__)

PREFIX = "fake-sleep:"


class SleepingEngine:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.description = f"{PREFIX}{seconds:g} (fake engine: sleeps, no model)"

    @classmethod
    def from_spec(cls, spec: str) -> SleepingEngine:
        engine = cls(float(spec.removeprefix(PREFIX)))
        log.warning("FAKE ENGINE: %s; images are flat grey", engine.description)
        return engine

    def generate(self, params, on_step=None):
        for step in range(params.steps):
            time.sleep(self.seconds / params.steps)
            if on_step is not None:
                on_step(step + 1, params.steps)
        return Image.new("RGB", (params.width, params.height), (128, 128, 128))
