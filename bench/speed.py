"""Seconds per FLUX.1-dev image: plain diffusers against fluxserve's speed presets, on one GPU.

    python bench/speed.py                 # FLUX.1-dev's full architecture, random weights (no download)
    python bench/speed.py --model black-forest-labs/FLUX.1-dev   # real weights: meaningful quality deltas
    python bench/speed.py --save          # also write bench/results/<gpu>-<time>.md and .json
    python bench/speed.py --smoke         # tiny model on CPU, seconds: checks the script end to end

For each variant (plain diffusers eager bf16, then each preset through fluxserve's Engine) and size it
reports seconds per image (median), images/hour, speed-up over the baseline of the same run, how close
the transformer gets to the hardware floor (exact FLOPs of one step × steps ÷ the GPU's dense peak;
bf16 floor, or fp8 floor for the linear layers when float8 is on), peak GPU memory, cold start (weights
in host memory → optimised, compiled, first image), restart with a warm compile cache, PSNR/SSIM of each
image against the `quality` preset's at the same seed, and one image's latency through the HTTP server
against the engine alone. With random weights, PSNR measures numerical drift, not visual quality, and the
step cache's hit rate (steps computed) differs from real weights: use --model for those two. The floor
counts every step's FLOPs, so a preset that skips steps (turbo) can pass 100 %.

Settings come from the environment as for the server, e.g. FLUXSERVE_SPEED_COMPILE_MODE=max-autotune.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxserve.config import Settings  # noqa: E402
from fluxserve.engine import Engine, FluxEngine, GenerationParams  # noqa: E402
from fluxserve.engine.optimize import apply_speed  # noqa: E402
from fluxserve.engine.speed import plan_speed  # noqa: E402

# FLUX.1-dev's published configurations.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
    "use_quant_conv": False, "use_post_quant_conv": False,
    "scaling_factor": 0.3611, "shift_factor": 0.1159,
}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
          "hidden_act": "quick_gelu"}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0}

# Dense tensor-core peaks (TFLOP/s): (bf16, fp8). The longest matching name wins.
PEAK_TFLOPS = {
    "H100": (989, 1979), "H100 PCIe": (756, 1513), "H100 NVL": (835, 1671), "H200": (989, 1979),
    "L40S": (362, 733), "A100": (312, None),
}
TARGETS_1024 = {"quality": 3.6, "balanced": 2.0, "turbo": 1.0}  # seconds at 1024², 25 steps
PROMPT = "a lighthouse on a cliff at dusk, waves breaking below, warm light in the windows"
SEED = 1184522
GUIDANCE = 3.5
TEXT_TOKENS = 512


# -- models --------------------------------------------------------------------------------------

class Models:
    """Weights made once: text encoders stay on the device, shared; each variant gets its own
    transformer and VAE from host-memory copies (the presets fuse, quantise and compile them)."""

    def __init__(self, pipe, device: str) -> None:
        self.device = device
        self.shared = {name: part for name, part in pipe.components.items() if name not in ("transformer", "vae")}
        self.parts = {name: (type(part), dict(part.config), {k: v.detach().to("cpu") for k, v in
                                                             part.state_dict().items()})
                      for name, part in (("transformer", pipe.transformer), ("vae", pipe.vae))}

    def pipeline(self):
        from diffusers import FluxPipeline

        fresh = {}
        for name, (cls, config, state) in self.parts.items():
            with torch.device("meta"):
                module = cls.from_config(config)
            module.load_state_dict(state, assign=True)
            fresh[name] = module.to(self.device).eval()
        pipe = FluxPipeline(**self.shared, **fresh)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def transformer_config(self) -> dict:
        return self.parts["transformer"][1]


def full_size_random(device: str):
    """FLUX.1-dev's architecture with random weights: transformer, VAE, CLIP-L and T5-XXL at full size."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxserve.engine.tiny import FLUX_SCHEDULER_CONFIG, build_tiny_pipeline

    tokenizers = build_tiny_pipeline().components  # byte-level tokenizers; token ids fit the full vocabularies
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
            vae = AutoencoderKL(**FLUX_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL))
    finally:
        torch.set_default_dtype(default_dtype)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizers["tokenizer"], text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizers["tokenizer_2"], transformer=transformer.eval(),
    )


def make_models(args) -> Models:
    if args.smoke:
        from fluxserve.engine.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline().to(args.device, torch.bfloat16)
    elif args.model:
        from fluxserve.engine.loading import ModelSource, load_pipeline

        pipe = load_pipeline(ModelSource.parse(args.model, args.base_model), device=args.device, dtype=torch.bfloat16)
    else:
        pipe = full_size_random(args.device)
    models = Models(pipe, args.device)
    del pipe
    release()
    return models


# -- measuring -----------------------------------------------------------------------------------

def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call):
    sync()
    started = time.perf_counter()
    result = call()
    sync()
    return result, time.perf_counter() - started


def step_flops(transformer_config: dict, width: int, height: int) -> tuple[float, float]:
    """Exact FLOPs of one transformer step at width×height: (linear layers, attention), counted by
    PyTorch's FlopCounterMode on a weightless (meta-device) copy of the model."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    tokens = (width // 16) * (height // 16)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
        inputs = {
            "hidden_states": torch.zeros(1, tokens, config["in_channels"]),
            "encoder_hidden_states": torch.zeros(1, TEXT_TOKENS, config["joint_attention_dim"]),
            "pooled_projections": torch.zeros(1, config["pooled_projection_dim"]),
            "timestep": torch.ones(1), "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(TEXT_TOKENS, 3),
            "guidance": torch.ones(1) if config.get("guidance_embeds") else None,
        }
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, return_dict=False)
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    attention = sum(flops for op, flops in counts.items() if "bmm" in op or "attention" in op)
    return counter.get_total_flops() - attention, attention


def peak_tflops(gpu: str, override_bf16: float | None, override_fp8: float | None):
    matches = [name for name in PEAK_TFLOPS if name.lower() in gpu.lower()]
    bf16, fp8 = PEAK_TFLOPS[max(matches, key=len)] if matches else (None, None)
    return override_bf16 or bf16, override_fp8 or fp8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels with the usual 11×11 Gaussian window (σ = 1.5)."""
    x = torch.from_numpy(a).permute(2, 0, 1)[:, None].double()
    y = torch.from_numpy(b).permute(2, 0, 1)[:, None].double()
    grid = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(grid**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    blur = lambda t: torch.nn.functional.conv2d(t, window)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


class StepCounter:
    """Counts transformer steps, and those the first-block cache computed in full (not skipped)."""

    def __init__(self, transformer) -> None:
        self.calls = self.computed = 0
        self._handles = [transformer.register_forward_pre_hook(self._call)]
        registry = getattr(transformer.single_transformer_blocks[-1], "_diffusers_hook", None)
        self._hook = registry.get_hook("fbc_block_hook") if registry is not None else None
        if self._hook is not None:
            self._handles.append(transformer.single_transformer_blocks[-1].register_forward_hook(self._tail))

    def _call(self, *_):
        self.calls += 1

    def _tail(self, *_):
        self.computed += bool(self._hook.state_manager.get_state().should_compute)

    def take(self) -> str | None:
        text = f"{self.computed}/{self.calls}" if self._hook is not None else None
        self.calls = self.computed = 0
        return text


@dataclass
class Row:
    variant: str
    width: int
    height: int
    seconds: float  # median of the timed images
    first_seconds: float  # the first image at this size (compiles a size that was not warmed up)
    peak_gib: float | None
    steps_computed: str | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    speedup: float | None = None
    floor_percent: float | None = None
    image: np.ndarray | None = field(default=None, repr=False)


@dataclass
class VariantResult:
    variant: str
    options: list[str]
    skipped: dict[str, str]
    cold_start_s: float
    restart_s: float | None = None
    rows: list[Row] = field(default_factory=list)


def engine_for(variant: str, pipe, args, warmup: tuple[int, int]):
    """(a function making one image, the applied options) for one variant on a fresh pipeline."""
    if variant == "diffusers":
        def plain(width, height, seed):
            with torch.inference_mode():
                return pipe(PROMPT, width=width, height=height, num_inference_steps=args.steps,
                            guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS,
                            generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        return plain, None, ["bf16"], {}
    no_compile = args.smoke and not args.compile_on_cpu
    overrides = {"speed_compile": False} if no_compile else {}
    settings = Settings(speed_preset=variant, speed_warmup_sizes=f"{warmup[0]}x{warmup[1]}",
                        speed_compile_cache_dir=args.cache_dir, device=args.device, **overrides)
    speed = apply_speed(pipe, plan_speed(settings.speed, settings.model, args.device))
    engine = FluxEngine(pipe, max_sequence_length=TEXT_TOKENS, description=variant, speed=speed)
    speed.warm_up(engine.generate)

    def generate(width, height, seed):
        return engine.generate(GenerationParams(PROMPT, width, height, args.steps, seed, GUIDANCE))
    skipped = {**speed.plan.skipped, **({"compile": "off in --smoke (add --compile-on-cpu)"} if no_compile else {})}
    return generate, engine, speed.plan.options.enabled(), skipped


def run_variant(variant: str, models: Models, args, http: dict | None) -> VariantResult:
    release()
    started = time.perf_counter()
    pipe = models.pipeline()
    generate, engine, options, skipped = engine_for(variant, pipe, args, args.sizes[0])
    counter = StepCounter(pipe.transformer)
    result = VariantResult(variant, options, skipped, cold_start_s=0.0)
    for index, (width, height) in enumerate(args.sizes):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        image, first = timed(partial(generate, width, height, SEED))
        if index == 0:
            result.cold_start_s = time.perf_counter() - started
        counter.take()
        seconds = [timed(partial(generate, width, height, SEED))[1] for _ in range(args.repeats)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        result.rows.append(Row(variant, width, height, statistics.median(seconds), first, peak,
                               steps_computed=counter.take(), image=np.array(image)))
        print(f"  {variant} {width}x{height}: {statistics.median(seconds):.3f} s/image (first {first:.1f} s)",
              flush=True)
        if result.rows[-1].image.std() == 0:
            print(f"  warning: {variant} {width}x{height} gave a flat image (NaN or overflow?)", flush=True)
    if http is not None and engine is not None and variant == args.http_preset:
        http.update(http_latency(engine, args))
    compiled = "compile" in options
    del generate, engine, pipe, counter
    torch._dynamo.reset()
    if compiled and args.restart:
        result.restart_s = restart_time(variant, models, args)
    return result


def restart_time(variant: str, models: Models, args) -> float:
    """Cold start again, now that the compiled kernels are on disk: what a server restart costs."""
    release()
    started = time.perf_counter()
    pipe = models.pipeline()
    generate, *_ = engine_for(variant, pipe, args, args.sizes[0])
    timed(partial(generate, *args.sizes[0], SEED))
    seconds = time.perf_counter() - started
    del generate, pipe
    torch._dynamo.reset()
    return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_latency(engine: Engine, args) -> dict:
    """One image through the real server (v1, JPG) against the same request on the engine alone."""
    import httpx
    import uvicorn

    from fluxserve.api import create_app
    from fluxserve.services import Services

    width, height = args.sizes[0]
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir), model=f"bench:{engine.description}", port=free_port())
        # The server runs the engine already built here instead of loading one.
        app = create_app(settings, Services(settings, engine_loader=lambda _settings: engine))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{settings.port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=2).json().get("engine") == "ready":
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            params = GenerationParams(PROMPT, width, height, args.steps, SEED, GUIDANCE)
            body = {"positivePrompt": PROMPT, "width": width, "height": height, "steps": args.steps,
                    "seed": SEED, "CFGScale": GUIDANCE, "outputFormat": "JPG"}

            def through_http():
                response = httpx.post(f"{url}/v1/{settings.model.slug}", json=body, timeout=3600)
                response.raise_for_status()
                return response

            through_http()  # the first request through a fresh server pays for its own set-up
            engine_s, http_s = [], []
            for _ in range(args.repeats):  # alternated, so drift hits both alike
                engine_s.append(timed(lambda: engine.generate(params))[1])
                response, seconds = timed(through_http)
                http_s.append(seconds)
            metrics = httpx.get(f"{url}/v2/requests/{response.headers['X-Request-Id']}", timeout=30).json()["metrics"]
        finally:
            server.should_exit = True
            thread.join(60)
    http_s, engine_s = statistics.median(http_s), statistics.median(engine_s)
    return {"preset": args.http_preset, "width": width, "height": height, "http_s": http_s, "engine_s": engine_s,
            "overhead_s": http_s - engine_s, "metrics": metrics}


# -- report --------------------------------------------------------------------------------------

def fill_comparisons(results: list[VariantResult], floors: dict, steps: int) -> None:
    rows = {(row.variant, row.width, row.height): row for result in results for row in result.rows}
    for result in results:
        fp8 = "fp8" in result.options
        for row in result.rows:
            base = rows.get(("diffusers", row.width, row.height))
            if base is not None:
                row.speedup = base.seconds / row.seconds
            per_step = floors.get((row.width, row.height, fp8))
            if per_step:
                row.floor_percent = 100 * per_step * steps / row.seconds
            reference = rows.get(("diffusers" if row.variant == "quality" else "quality", row.width, row.height))
            if reference is not None and reference is not row and row.variant != "diffusers":
                row.psnr_db, row.ssim = psnr(row.image, reference.image), ssim(row.image, reference.image)


def fmt(value, pattern: str, empty: str = "–") -> str:
    return empty if value is None else pattern.format(value)


def report(results: list[VariantResult], http: dict | None, header: dict, args) -> str:
    lines = [f"# fluxserve speed: {header['gpu']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| variant | size | s/image | images/h | × diffusers | % of floor | peak GPU GiB | first image s "
              "| steps computed | PSNR dB | SSIM |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result.rows:
            lines.append(
                f"| {row.variant} | {row.width}×{row.height} | {row.seconds:.3f} | {3600 / row.seconds:,.0f} "
                f"| {fmt(row.speedup, '{:.2f}×')} | {fmt(row.floor_percent, '{:.0f} %')} "
                f"| {fmt(row.peak_gib, '{:.1f}')} "
                f"| {row.first_seconds:.1f} | {row.steps_computed or '–'} | {fmt(row.psnr_db, '{:.1f}')} "
                f"| {fmt(row.ssim, '{:.4f}')} |"
            )
    lines += ["", "| variant | options applied | skipped | cold start s | restart (warm compile cache) s |",
              "|---|---|---|---|---|"]
    for result in results:
        skipped = "; ".join(f"{name}: {why}" for name, why in result.skipped.items()) or "–"
        lines.append(f"| {result.variant} | {', '.join(result.options) or '–'} | {skipped} "
                     f"| {result.cold_start_s:.1f} | {fmt(result.restart_s, '{:.1f}')} |")
    if http:
        lines += ["", f"HTTP (v1, {http['width']}×{http['height']}, preset {http['preset']}, metrics say "
                  f"{http['metrics'].get('speed_preset')}): {http['http_s']:.3f} s through the server, "
                  f"{http['engine_s']:.3f} s engine only, overhead {http['overhead_s'] * 1000:.0f} ms "
                  f"(server metrics: inference {http['metrics']['inference_time']} s, "
                  f"encode {http['metrics']['encode_time']} s, queue {http['metrics']['queue_time']} s)"]
    lines += ["", *targets(results, args)]
    return "\n".join(lines) + "\n"


def targets(results: list[VariantResult], args) -> list[str]:
    if args.smoke or args.steps != 25:
        return ["Targets (1024², 25 steps, H100) are checked only on full runs."]
    rows = {row.variant: row for result in results for row in result.rows if (row.width, row.height) == (1024, 1024)}
    lines = ["Targets at 1024², 25 steps:"]
    for preset, limit in TARGETS_1024.items():
        row = rows.get(preset)
        if row is None:
            continue
        verdict = "met" if row.seconds <= limit else f"missed by {row.seconds - limit:.2f} s"
        lines.append(f"- {preset} ≤ {limit} s: {row.seconds:.3f} s, {verdict}")
    if "balanced" in rows and rows["balanced"].speedup is not None:
        speedup = rows["balanced"].speedup
        lines.append(f"- balanced ≥ 3× diffusers: {speedup:.2f}×, " + ("met" if speedup >= 3 else "missed"))
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, tiny sizes: checks the script")
    parser.add_argument("--sizes", default=None,
                        help="square sizes, or WxH, first is warmed up (default 1024,512,2048)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    parser.add_argument("--repeats", type=int, default=None, help="timed images per size (default 3)")
    parser.add_argument("--presets", default="quality,balanced,turbo")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip plain diffusers")
    parser.add_argument("--model", help="real weights (repo id, folder, .safetensors) instead of random ones")
    parser.add_argument("--base-model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="compile cache (default: a fresh temp dir)")
    parser.add_argument("--no-restart", dest="restart", action="store_false", help="skip the warm-cache restart")
    parser.add_argument("--http-preset", default="balanced", help="the preset measured through HTTP ('' for none)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="with --smoke: compile too (slow)")
    parser.add_argument("--peak-tflops-bf16", type=float)
    parser.add_argument("--peak-tflops-fp8", type=float)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--save", action="store_true", help="write bench/results/<gpu>-<time>.md/.json (GPU runs)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.steps = args.steps or (3 if smoke else 25)
    args.repeats = args.repeats or (1 if smoke else 3)
    args.sizes = [parse_size(s) for s in (args.sizes or ("128,192" if smoke else "1024,512,2048")).split(",")]
    args.presets = [p for p in args.presets.split(",") if p]
    if args.http_preset and args.http_preset not in args.presets:
        args.http_preset = args.presets[-1] if args.presets else ""
    if smoke and not args.compile_on_cpu:
        args.restart = False
    return args


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def environment(args, gpu: str) -> dict:
    import diffusers

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = "not installed"
    return {
        "gpu": gpu, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.model or ("tiny random-weight model (smoke)" if args.smoke else
                                "FLUX.1-dev architecture, random weights (bf16)"),
        "steps": args.steps, "timed images per size": args.repeats, "torch": torch.__version__,
        "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "torchao": torchao_version,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save and not args.device.startswith("cuda"):
        print("--save keeps GPU results only; this run is on", args.device, file=sys.stderr)
        return 2
    cache = tempfile.TemporaryDirectory(prefix="fluxserve-compile-")
    args.cache_dir = args.cache_dir or Path(cache.name)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    print(f"building models on {gpu} ...", flush=True)
    models = make_models(args)
    bf16_peak, fp8_peak = peak_tflops(gpu, args.peak_tflops_bf16, args.peak_tflops_fp8)
    floors, header = {}, environment(args, gpu)
    for width, height in args.sizes:
        linear, attention = step_flops(models.transformer_config, width, height)
        total_tflop, attention_tflop = (linear + attention) / 1e12, attention / 1e12
        header[f"FLOPs per step {width}×{height}"] = f"{total_tflop:.4g} TFLOP ({attention_tflop:.4g} attention)"
        if bf16_peak:
            floors[(width, height, False)] = (linear + attention) / (bf16_peak * 1e12)
            header[f"bf16 floor {width}×{height}"] = f"{floors[(width, height, False)] * args.steps:.2f} s"
        if bf16_peak and fp8_peak:
            floors[(width, height, True)] = linear / (fp8_peak * 1e12) + attention / (bf16_peak * 1e12)
            header[f"fp8 floor {width}×{height}"] = f"{floors[(width, height, True)] * args.steps:.2f} s"
    http: dict | None = {} if args.http_preset else None
    variants = (["diffusers"] if args.baseline else []) + args.presets
    results = []
    for variant in variants:
        print(f"{variant} ...", flush=True)
        results.append(run_variant(variant, models, args, http))
    fill_comparisons(results, floors, args.steps)
    text = report(results, http or None, header, args)
    print(text)
    payload = {"environment": header, "http": http or None,
               "variants": [{**{k: v for k, v in asdict(r).items() if k != "rows"},
                             "rows": [{k: v for k, v in asdict(row).items() if k != "image"} for row in r.rows]}
                            for r in results]}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.save:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-") + datetime.now().strftime("-%Y%m%d-%H%M")
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
        print(f"saved bench/results/{stem}.md and .json")
    cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
