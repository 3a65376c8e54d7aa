"""The engine: one loaded FLUX pipeline, and `generate()` for one request.

Every request gets its own scheduler instance and its own `torch.Generator` seeded from the request,
so the same request gives the same pixels and concurrent jobs never share sampler state. Any
width/height in range is honoured exactly: the pipeline runs at the next multiple of 16 and the
result is center-cropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fluxserve.engine.schedulers import build_scheduler

log = logging.getLogger(__name__)

# FLUX's VAE downsamples 8x and the transformer packs 2x2 patches.
SIZE_MULTIPLE = 16

ProgressCallback = Callable[[int, int], None]


class GenerationCancelled(Exception):
    """Raised from inside the denoising loop when the caller asks to stop."""


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    guidance: float
    scheduler: str = "Euler"


def padded(size: int) -> int:
    return -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE


def center_crop(image, width: int, height: int):
    if image.size == (width, height):
        return image
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


class Engine:
    def __init__(self, pipeline, *, max_sequence_length: int = 512, description: str = "", speed=None) -> None:
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.description = description
        # Speed options applied to the pipeline (fluxserve/engine/optimize.py); none by default.
        if speed is None:
            from fluxserve.engine.optimize import AppliedSpeed

            speed = AppliedSpeed()
        self.speed = speed
        self._base_scheduler_config = dict(pipeline.scheduler.config)
        # One generation at a time per pipeline: the modules are shared, and on one GPU running two
        # denoising loops side by side is slower than running them one after the other.
        self._lock = threading.Lock()

    def generate(self, params: GenerationParams, on_step: ProgressCallback | None = None):
        """Run the pipeline for one request; returns a PIL image of exactly width×height."""
        import torch
        from diffusers import FluxPipeline

        scheduler = build_scheduler(params.scheduler, self._base_scheduler_config)
        pipe = FluxPipeline(**{**self.pipeline.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(params.seed)

        def step_end(_pipe, step: int, _timestep, tensors):
            if on_step is not None:
                on_step(step + 1, params.steps)
            return tensors

        speed = self.speed.during(pipe, padded(params.width), padded(params.height))  # speed options
        with self._lock, torch.inference_mode(), speed:
            image = pipe(
                prompt=params.prompt,
                width=padded(params.width),
                height=padded(params.height),
                num_inference_steps=params.steps,
                guidance_scale=float(params.guidance),
                generator=generator,
                max_sequence_length=self.max_sequence_length,
                callback_on_step_end=step_end,
                output_type="pil",
            ).images[0]
        return center_crop(image, params.width, params.height)


def load_engine(settings) -> Engine:
    """The engine for the configured model (building the tiny demo model when none is configured)."""
    from fluxserve.engine.loading import ModelSource, load_pipeline, resolve_device_and_dtype

    model = settings.model or str(ensure_demo_model(settings))
    source = ModelSource.parse(model, settings.base_model)
    device, dtype = resolve_device_and_dtype(settings.device, settings.dtype)
    started = time.perf_counter()
    pipeline = load_pipeline(source, device=device, dtype=dtype)
    log.info("model loaded in %.1fs", time.perf_counter() - started)
    # Speed options (fluxserve/engine/speed.py, optimize.py): applied, then warmed up before serving.
    from fluxserve.engine.optimize import apply_speed
    from fluxserve.engine.speed import plan_speed

    speed = apply_speed(pipeline, plan_speed(settings, device))
    engine = Engine(pipeline, max_sequence_length=settings.max_sequence_length, description=model, speed=speed)
    speed.warm_up(engine.generate)
    return engine


def ensure_demo_model(settings):
    from fluxserve.engine.tiny import save_tiny_model

    target = settings.tiny_model_dir
    if not (target / "model_index.json").is_file():
        log.info("building the tiny demo model in %s", target)
        save_tiny_model(target)
    return target
