"""Applying a SpeedPlan to a loaded FLUX pipeline, warming it up, and the per-request parts.

Order matters: cast to bf16, fuse QKV (and drop the unfused copies), pick the attention kernel, quantise
to float8, compile the transformer blocks (regional compilation: each block class is compiled once and
reused by all 57 blocks), and only then add the step-cache hooks, so the cache's skip decision runs
outside the compiled graphs and every block graph stays whole.

Compilation cannot hurt a request: the warm-up sizes are compiled at start-up, and only those sizes run
the compiled graphs afterwards; any other size runs eagerly (no compile, no autotuning, no recompile
limit on the request path). A compile error at warm-up turns compilation off for good, logged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

from fluxserve.engine.protocol import GenerationParams
from fluxserve.engine.speed import SpeedPlan
from fluxserve.engine.vae_tiling import tiled_if_needed

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
# Regional, static compilation keeps a cache entry per block class and size, two for the single-stream
# block (later single blocks get a strided slice of the hidden states).
ENTRIES_PER_SIZE = 2
# AdaLN modulation layers: `norm1.linear`, `norm1_context.linear` (double blocks), `norm.linear` (single).
ADALN_LINEAR = re.compile(r"(^|\.)norm\w*\.linear$")
# diffusers' fused projection → the separate ones it leaves behind.
UNFUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


class CompiledForward:
    """A module's forward with a compiled twin, used only while `use_compiled()` says so."""

    def __init__(self, original, use_compiled, **compile_kwargs) -> None:
        import torch

        self.original = original
        self.compiled = torch.compile(original, **compile_kwargs)
        self.use_compiled = use_compiled

    def __call__(self, *args, **kwargs):
        return (self.compiled if self.use_compiled() else self.original)(*args, **kwargs)


def fp8_eligible(module, name: str = "") -> bool:
    """Linear layers worth float8: both dimensions multiples of 16 (what float8 matmuls accept), and not
    an AdaLN modulation layer (`norm*.linear`): its input is one row per sample (the timestep embedding),
    so float8 saves nothing there and its error would shift and scale every token of the block."""
    import torch

    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0 and not ADALN_LINEAR.search(name))


def repeated_blocks(transformer) -> list:
    """The transformer's blocks: FLUX has 19 double-stream and 38 single-stream blocks."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def drop_unfused_projections(transformer) -> int:
    """After `fuse_qkv_projections`, remove the separate q/k/v layers diffusers keeps beside the fused ones
    (it has no call for that): the fused path never calls them, and on FLUX.1-dev they hold 2.1 B
    parameters (4.3 GB in bf16) that would also be quantised for nothing. Returns how many were removed."""
    import torch
    from diffusers.models.attention import AttentionModuleMixin

    removed = 0
    for module in transformer.modules():
        if not (isinstance(module, AttentionModuleMixin) and getattr(module, "fused_projections", False)):
            continue
        for fused, parts in UNFUSED_PROJECTIONS.items():
            if isinstance(getattr(module, fused, None), torch.nn.Linear):
                for part in parts:
                    if isinstance(getattr(module, part, None), torch.nn.Module):
                        delattr(module, part)
                        removed += 1
    return removed


def quantize_fp8(transformer) -> int:
    """Float8 weights and per-row dynamically scaled float8 activations for the blocks' linear layers."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    count = 0
    for block in repeated_blocks(transformer):
        count += sum(1 for name, module in block.named_modules() if fp8_eligible(module, name))
        quantize_(block, config, filter_fn=fp8_eligible)
    return count


def configure_compiler(directory, recompile_limit: int) -> None:
    """Compiled kernels and autotuning results kept on disk (a restart skips compiling), and room for the
    warm-up sizes' graphs. Errors are not suppressed: warm-up catches them and serves uncompiled."""
    import torch._dynamo.config
    import torch._inductor.config

    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        # Inductor and Triton read their cache location from the environment when they compile.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._dynamo.config.recompile_limit = recompile_limit
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, recompile_limit * 4
    )


def compiler_stance(stance: str):
    """torch.compiler.set_stance as a context manager (PyTorch 2.6+; a no-op before).

    The stance is process-wide: fine here, one engine generates at a time."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance(stance) if set_stance is not None else nullcontext()


def attention_in_use(plan: SpeedPlan) -> str:
    """The attention backend generation runs: the plan's, or diffusers' default."""
    if plan.options.attention != "default":
        return plan.options.attention
    return os.environ.get("DIFFUSERS_ATTN_BACKEND", "native")


@dataclass
class AppliedSpeed:
    """The speed options as applied to one pipeline: the plan, the compiled forwards, and which sizes
    run them (the warm-up sizes once warmed up; every size for a dynamic-shape compile)."""

    plan: SpeedPlan = field(default_factory=SpeedPlan)
    compiled: list[CompiledForward] = field(default_factory=list)
    compiled_sizes: set[tuple[int, int]] = field(default_factory=set)
    warmed_up: bool = False
    # Per thread: whether the job running (or last run) on this thread runs compiled.
    _job: threading.local = field(default_factory=threading.local, repr=False)

    def runs_compiled(self, width: int, height: int) -> bool:
        if not (self.plan.options.compile and self.compiled):
            return False
        if self.warmed_up and self.plan.compile_dynamic and self.compiled_sizes:
            return True
        return (width, height) in self.compiled_sizes

    def _use_compiled(self) -> bool:
        return getattr(self._job, "active", False) and getattr(self._job, "compiled", False)

    def metrics(self) -> dict:
        """Speed preset and options; the attention backend; whether this thread's last job ran compiled."""
        metrics = {**self.plan.metrics(), "attention_backend": attention_in_use(self.plan)}
        if hasattr(self._job, "compiled"):
            metrics["compiled"] = self._job.compiled
        return metrics

    @contextmanager
    def during(self, pipe, width: int, height: int):
        """Around one generation: compiled graphs or not, a fresh step cache, VAE tiling when needed."""
        compiled = self.runs_compiled(width, height)
        self._job.compiled = compiled
        self._job.active = True
        try:
            with ExitStack() as stack:
                if compiled and self.warmed_up:
                    # A guard change at a compiled size (rare) runs eagerly instead of compiling here.
                    stack.enter_context(compiler_stance("eager_on_recompile"))
                if self.plan.options.step_cache:
                    # A cancelled run leaves the previous image's residuals behind; never reuse them.
                    pipe.transformer._reset_stateful_cache()
                if self.plan.auto_vae_tiling:
                    tiling = tiled_if_needed(pipe.vae, width, height, min_pixels=self.plan.vae_tiling_min_pixels)
                    if stack.enter_context(tiling):
                        log.debug("VAE tiling on for %dx%d", width, height)
                yield
        finally:
            self._job.active = False

    def warm_up(self, generate) -> None:
        """Compile for each warm-up size now, not on a user's request; on any failure serve uncompiled."""
        if not self.compiled:
            return
        if not self.plan.warmup_sizes:
            self.disable_compile("no warm-up sizes (FLUXSERVE_SPEED_WARMUP_SIZES), and no size compiles on a request")
            log.warning("torch.compile is on but no warm-up sizes are set: serving uncompiled")
            return
        for width, height in self.plan.warmup_sizes:
            started = time.perf_counter()
            self.compiled_sizes.add((width, height))
            try:
                with compiler_stance("default"):
                    generate(GenerationParams("warm-up", width, height, steps=WARMUP_STEPS, seed=0, guidance=3.5))
            except Exception as exc:  # a compiler problem must not take the server down
                log.exception("torch.compile failed while warming up %dx%d; serving uncompiled", width, height)
                self.disable_compile(f"failed at warm-up: {type(exc).__name__}: {exc}")
                return
            log.info("compiled and warmed up %dx%d in %.1fs", width, height, time.perf_counter() - started)
        self.warmed_up = True
        self._job = threading.local()  # the warm-up images are nobody's job: no "last job" to report
        others = "every other size uses the same graphs" if self.plan.compile_dynamic else "other sizes run uncompiled"
        log.info("compiled sizes: %s; %s", ", ".join(f"{w}x{h}" for w, h in self.plan.warmup_sizes), others)

    def disable_compile(self, reason: str) -> None:
        self.compiled_sizes.clear()
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
        log.info("fused QKV projections; %d unfused copies removed", drop_unfused_projections(transformer))
    if options.attention != "default":
        # Set on the model even for "native": diffusers' process-wide default may have been changed.
        transformer.set_attention_backend(options.attention)
    if options.fp8:
        log.info("float8: %d linear layers quantised", quantize_fp8(transformer))
    if options.channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile:
        limit = max(plan.compile_recompile_limit, ENTRIES_PER_SIZE * len(plan.warmup_sizes))
        configure_compiler(plan.compile_cache_dir, limit)
        settings = {"mode": plan.compile_mode, "dynamic": plan.compile_dynamic}
        for block in repeated_blocks(transformer):
            block.forward = CompiledForward(block.forward, applied._use_compiled, fullgraph=True, **settings)
            applied.compiled.append(block.forward)
        pipe.vae.decoder.forward = CompiledForward(pipe.vae.decoder.forward, applied._use_compiled, **settings)
        applied.compiled.append(pipe.vae.decoder.forward)
    if options.step_cache:
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=plan.step_cache_threshold))
    log.info("%s; attention backend %s", plan.describe(), attention_in_use(plan))
    return applied
