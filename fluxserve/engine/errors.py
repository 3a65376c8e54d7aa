"""What can go wrong inside a generation, said plainly: each is a FAILED job with this message."""

from __future__ import annotations

from fluxserve.failures import JobFailure


class OutOfMemory(JobFailure):
    def __init__(self, width: int, height: int) -> None:
        super().__init__(
            f"Generation failed: out of GPU memory at {width}x{height}. Try a smaller size, or start the "
            "server with FLUXSERVE_MEMORY_MODE=model_cpu_offload and/or FLUXSERVE_VAE_TILING=true."
        )


class InvalidImage(JobFailure):
    def __init__(self) -> None:
        super().__init__(
            "Generation failed: the model produced an invalid image (NaN or infinite values, which would "
            "come out black). This usually means float16 overflow or broken weights; bfloat16 or float32 "
            "(FLUXSERVE_DTYPE) avoids the former."
        )
