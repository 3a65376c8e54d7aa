"""Applying a SpeedPlan to a loaded FLUX pipeline, warming it up, and the per-request parts.

Order matters: cast to bf16, fuse QKV, pick the attention kernel, quantise to float8, compile the
transformer blocks (regional compilation: each block class is compiled once and reused by all 57
blocks), and only then add the step-cache hooks, so the cache's skip decision runs outside the
compiled graphs and every block graph stays whole.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from fluxserve.engine.protocol import GenerationParams
from fluxserve.engine.speed import SpeedPlan
from fluxserve.engine.vae_tiling import tiled_if_needed

log = logging.getLogger(__name__)

# Static shapes give each size its own graphs (three per size); room for many sizes before dynamo
# gives up and runs a new size eagerly.
RECOMPILE_LIMIT = 64
WARMUP_STEPS = 2


class CompiledForward:
    """A module's forward with a compiled twin; switching `enabled` off falls back to the original."""

    def __init__(self, original, **compile_kwargs) -> None:
        import torch

        self.original = original
        self.compiled = torch.compile(original, **compile_kwargs)
        self.enabled = True

    def __call__(self, *args, **kwargs):
        return (self.compiled if self.enabled else self.original)(*args, **kwargs)


def fp8_eligible(module, _name: str = "") -> bool:
    """Linear layers whose shapes float8 matmuls accept (both dimensions multiples of 16)."""
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def repeated_blocks(transformer) -> list:
    """The transformer's blocks: FLUX has 19 double-stream and 38 single-stream blocks."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def quantize_fp8(transformer) -> int:
    """Float8 weights and per-row dynamically scaled float8 activations for the blocks' linear layers."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    count = 0
    for block in repeated_blocks(transformer):
        quantize_(block, config, filter_fn=fp8_eligible)
        count += sum(1 for module in block.modules() if fp8_eligible(module))
    return count


def configure_compiler(directory) -> None:
    """Compiled kernels and autotuning results kept on disk (a restart skips compiling), room for many
    sizes, and eager fallback for a graph that cannot compile."""
    import torch._dynamo.config
    import torch._inductor.config

    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        # Inductor and Triton read their cache location from the environment when they compile.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, RECOMPILE_LIMIT * 4
    )
    # A graph that fails to compile (say, for a size first seen on a request) runs eagerly, logged,
    # instead of failing the user's job.
    torch._dynamo.config.suppress_errors = True


@dataclass
class AppliedSpeed:
    """The speed options as applied to one pipeline: the plan, and the compiled forwards (to undo)."""

    plan: SpeedPlan = field(default_factory=SpeedPlan)
    compiled: list[CompiledForward] = field(default_factory=list)

    def metrics(self) -> dict:
        return self.plan.metrics()

    @contextmanager
    def during(self, pipe, width: int, height: int):
        """Around one generation: a fresh step cache, and VAE tiling when this size needs it."""
        if self.plan.options.step_cache:
            # A cancelled run leaves the previous image's residuals behind; never reuse them.
            pipe.transformer._reset_stateful_cache()
        if not self.plan.auto_vae_tiling:
            yield
            return
        with tiled_if_needed(pipe.vae, width, height, min_pixels=self.plan.vae_tiling_min_pixels) as tiled:
            if tiled:
                log.debug("VAE tiling on for %dx%d", width, height)
            yield

    def warm_up(self, generate) -> None:
        """Compile for each configured size now, not on a user's request; fall back to eager on failure."""
        if not self.compiled or not self.plan.warmup_sizes:
            return
        for width, height in self.plan.warmup_sizes:
            started = time.perf_counter()
            try:
                generate(GenerationParams("warm-up", width, height, steps=WARMUP_STEPS, seed=0, guidance=3.5))
            except Exception as exc:  # a compiler problem must not take the server down
                log.exception("torch.compile failed while warming up %dx%d; serving uncompiled", width, height)
                self.disable_compile(f"failed at warm-up: {type(exc).__name__}: {exc}")
                return
            log.info("warmed up %dx%d in %.1fs", width, height, time.perf_counter() - started)

    def disable_compile(self, reason: str) -> None:
        for forward in self.compiled:
            forward.enabled = False
        self.plan = self.plan.without("compile", reason)


def apply_speed(pipe, plan: SpeedPlan) -> AppliedSpeed:
    """Apply `plan` to `pipe` in place; the returned AppliedSpeed goes with the Engine."""
    import torch

    options = plan.options
    transformer = pipe.transformer
    applied = AppliedSpeed(plan=plan)
    if options.bf16:
        pipe.to(dtype=torch.bfloat16)
    if options.fuse_qkv:
        transformer.fuse_qkv_projections()
    if options.attention not in ("default", "native"):
        transformer.set_attention_backend(options.attention)
    if options.fp8:
        log.info("float8: %d linear layers quantised", quantize_fp8(transformer))
    if options.channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile:
        configure_compiler(plan.compile_cache_dir)
        settings = {"mode": plan.compile_mode, "dynamic": plan.compile_dynamic}
        for block in repeated_blocks(transformer):
            block.forward = CompiledForward(block.forward, fullgraph=True, **settings)
            applied.compiled.append(block.forward)
        pipe.vae.decoder.forward = CompiledForward(pipe.vae.decoder.forward, **settings)
        applied.compiled.append(pipe.vae.decoder.forward)
    if options.step_cache:
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=plan.step_cache_threshold))
    log.info(plan.describe())
    return applied
