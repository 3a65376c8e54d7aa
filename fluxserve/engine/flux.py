"""The engine of a loaded FLUX pipeline.

Every request gets its own scheduler instance and its own `torch.Generator` seeded from the request,
so the same request gives the same pixels and concurrent jobs never share sampler state. Any
width/height in range is honoured exactly: the pipeline runs at the next multiple of 16 and the
result is center-cropped. A request's LoRA adapters are applied (and a previous job's taken off) under
the same lock as the generation (fluxserve/engine/lora.py). torch and diffusers are imported inside the
calls that need them, so an API process that never runs the model never loads them.
"""

from __future__ import annotations

import threading
from typing import Any

from fluxserve.engine.errors import InvalidImage, OutOfMemory
from fluxserve.engine.lora import DEFAULT_CACHE_SIZE, LoraRegistry, request_adapters
from fluxserve.engine.memory import after_generation, release_memory
from fluxserve.engine.optimize import AppliedSpeed
from fluxserve.engine.preview import LatentPreviews
from fluxserve.engine.protocol import GenerationParams, PreviewCallback, ProgressCallback
from fluxserve.engine.schedulers import build_scheduler
from fluxserve.engine.sizes import center_crop, padded


class FluxEngine:
    """The `Engine` of a loaded FLUX pipeline."""

    def __init__(self, pipeline, *, max_sequence_length: int = 512, description: str = "", speed=None,
                 loras: LoraRegistry | None = None, lora_cache_size: int = DEFAULT_CACHE_SIZE,
                 lora_slots: bool | None = None) -> None:
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.description = description
        # Speed options applied to the pipeline (fluxserve/engine/optimize.py); none by default.
        self.speed = speed or AppliedSpeed()
        self._base_scheduler_config = dict(pipeline.scheduler.config)
        # One generation at a time per pipeline: the modules are shared, and on one GPU running two
        # denoising loops side by side is slower than running them one after the other.
        self._lock = threading.Lock()
        # Per-request LoRAs: in fixed slots when the transformer is compiled (set up here, before the
        # warm-up compiles it), else loaded by name on first use. `lora_slots` overrides the choice.
        if lora_slots is None:
            lora_slots = bool(self.speed.plan.options.compile and self.speed.compiled)
        self.adapters = request_adapters(pipeline, loras, cache_size=lora_cache_size, slots=lora_slots)
        self._job = threading.local()  # this thread's last job's LoRA figures

    def metrics(self) -> dict[str, Any]:
        # speed_preset, speed_options, attention_backend; `compiled`: whether this thread's last job ran
        # the compiled graphs; lora_load_seconds, lora_swap_seconds (and `loras`) of this thread's last
        # job (the worker asks right after its job, on the same thread).
        applied = getattr(self._job, "loras", None)
        return {**self.speed.metrics(), **(applied.metrics() if applied is not None else {})}

    def generate(
        self,
        params: GenerationParams,
        on_step: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ):
        """Run the pipeline for one request; returns a PIL image of exactly width×height.

        `on_step(step, total)` runs after each denoising step; raising GenerationCancelled from it stops
        the run. `on_preview(image)`, when given, gets a low-resolution preview of every Nth step and the
        last (SPEED_PREVIEW_EVERY) while it is watched (`PreviewCallback`), just before a progress call (on
        a GPU, of a step or two before).
        """
        import numpy as np
        import torch
        from diffusers import FluxPipeline

        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        # Stochastic samplers draw their per-step noise from this same generator.
        scheduler = build_scheduler(params.scheduler, self._base_scheduler_config, generator=generator)
        pipe: Any = FluxPipeline(**{**self.pipeline.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)

        previews = None
        if on_preview is not None:
            previews = LatentPreviews(on_preview, padded(params.height), padded(params.width),
                                      pipe.vae_scale_factor, every=self.speed.plan.preview_every)

        def step_end(_pipe, step: int, _timestep, tensors):
            # Some samplers (Heun) take more model calls than `steps`; report the real count.
            total = len(_pipe.scheduler.timesteps)
            if previews is not None:
                previews.after_step(step, total, tensors["latents"])
            if on_step is not None:
                on_step(step + 1, total)
            return tensors

        speed = self.speed.during(pipe, padded(params.width), padded(params.height))  # speed options
        with self._lock:
            # This job's adapters and scales, none of the previous job's (outside inference mode: loading
            # an adapter creates parameters).
            self._job.loras = None
            self._job.loras = self.adapters.apply(params.loras)
            with torch.inference_mode(), speed:
                pixels = self._run(pipe, params, generator, step_end)
        # Checked before the cast to 8 bits, which would silently turn NaN into black.
        if not np.isfinite(pixels).all():
            raise InvalidImage()
        image = pipe.image_processor.numpy_to_pil(pixels)[0]
        return center_crop(image, params.width, params.height)

    def _run(self, pipe, params: GenerationParams, generator, step_end):
        import torch

        try:
            return pipe(
                prompt=params.prompt,
                width=padded(params.width),
                height=padded(params.height),
                num_inference_steps=params.steps,
                guidance_scale=float(params.guidance),
                generator=generator,
                max_sequence_length=self.max_sequence_length,
                callback_on_step_end=step_end,
                output_type="np",
            ).images
        except torch.OutOfMemoryError:
            release_memory()
            raise OutOfMemory(params.width, params.height) from None
        finally:
            after_generation(self.pipeline)

