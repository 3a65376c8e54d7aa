"""Seconds per FLUX.1-dev image, one speed preset per command: sized for a lent GPU (see bench/GPU.md).

    python bench/speed.py --preset eager   --results bench/results/run.json   # plain diffusers: the baseline
    python bench/speed.py --preset quality --results bench/results/run.json   # then balanced, turbo
    python bench/speed.py --preset turbo --force-skip 0.5 --results ...       # step cache timed on random weights
    python bench/speed.py --preset quality --sizes 2048 --results ...         # 2048² memory
    python bench/speed.py --smoke          # tiny model on CPU, seconds: checks the script end to end

A command builds FLUX.1-dev's full architecture with random weights (no download; `--model` for real
weights), applies one preset (`eager` is plain diffusers in bf16, no compile) and warms up its sizes, then
reports per size: seconds per image (median), images/hour, speed-up over eager, % of the hardware floor
(exact FLOPs of a step × steps ÷ the GPU's dense peak; the fp8 floor for the linear layers when float8 is
on), peak GPU memory, whether the timed images ran compiled, steps computed, PSNR/SSIM against
`quality`'s image (eager's for quality, or before quality is measured); and per preset: cold start
(weights on the device → optimised, compiled, first image) and restart in a fresh process with the same
compile cache (process start → first image).

`--results FILE` keeps every command's rows (and images, for PSNR): the table printed after a command
compares all presets measured so far on that GPU. With random weights PSNR measures numerical drift, not
visual quality, and the step cache computes a different number of steps than with real weights: hence
`--force-skip`, which makes it skip a fixed share of the steps (labelled "forced"). The floor counts every
step's FLOPs, so a preset that skips steps can pass 100 %.

Settings come from the environment as for the server, e.g. FLUXSERVE_SPEED_COMPILE_MODE=max-autotune.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

STARTED_AT = time.time()  # before the heavy imports: --time-limit counts from here

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxserve.config import Settings  # noqa: E402
from fluxserve.engine import Engine, FluxEngine, GenerationParams  # noqa: E402
from fluxserve.engine.errors import InvalidImage  # noqa: E402
from fluxserve.engine.optimize import apply_speed  # noqa: E402
from fluxserve.engine.speed import plan_speed  # noqa: E402

IMPORTED_AT = time.time()

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
VARIANTS = ("eager", "quality", "balanced", "turbo")
TARGETS_1024 = {"quality": 3.6, "balanced": 2.0, "turbo": 1.0}  # seconds at 1024², 25 steps
TARGET_SPEEDUP = ("balanced", 3.0)  # × eager at 1024²
TARGET_RESTART_S = 30.0
TARGET_MEMORY_BYTES = 80e9  # at 2048²
PROMPT = "a lighthouse on a cliff at dusk, waves breaking below, warm light in the windows"
SEED = 1184522
GUIDANCE = 3.5
TEXT_TOKENS = 512


# -- models --------------------------------------------------------------------------------------

def full_size_random(device: str):
    """FLUX.1-dev's architecture with random weights: transformer, VAE, CLIP-L and T5-XXL at full size
    (the same weights in every process: seeded, built on the device)."""
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


def build_pipeline(args):
    """A fresh pipeline on the device in bf16: each preset fuses, quantises and compiles its own."""
    if args.smoke:
        from fluxserve.engine.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline().to(args.device, torch.bfloat16)
    elif args.model:
        from fluxserve.engine.loading import ModelSource, load_pipeline

        pipe = load_pipeline(ModelSource.parse(args.model, args.base_model), device=args.device, dtype=torch.bfloat16)
    else:
        pipe = full_size_random(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_config(args) -> dict:
    if args.smoke:
        from fluxserve.engine.tiny import build_tiny_pipeline

        return dict(build_tiny_pipeline().transformer.config)
    if args.model:
        from diffusers import FluxTransformer2DModel

        path = args.base_model if args.model.endswith((".safetensors", ".sft")) else args.model
        return dict(FluxTransformer2DModel.load_config(path, subfolder="transformer"))
    return FLUX_DEV_TRANSFORMER


# -- measuring -----------------------------------------------------------------------------------

def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call):
    """(result, seconds); a NaN image is a result (None), not a crash."""
    sync()
    started = time.perf_counter()
    try:
        result = call()
    except InvalidImage:
        result = None
    sync()
    return result, time.perf_counter() - started


def step_flops(config: dict, width: int, height: int) -> tuple[float, float]:
    """Exact FLOPs of one transformer step at width×height: (linear layers, attention), counted by
    PyTorch's FlopCounterMode on a weightless (meta-device) copy of the model."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = {k: v for k, v in config.items() if not k.startswith("_")}
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


def force_step_skip(transformer, fraction: float) -> None:
    """Make the first-block step cache skip `fraction` of each image's steps, evenly spread (the first
    step always computes). Random weights do not move the first block's output the way real ones do, so
    the threshold alone does not say how turbo performs; this times the cached steps."""
    hook = transformer.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    keep, step = 1.0 - fraction, [0]

    def decide(_residual) -> bool:
        if hook.state_manager.get_state().head_block_residual is None:
            step[0] = 0  # a new image
        index = step[0]
        step[0] += 1
        return index == 0 or math.floor(index * keep) != math.floor((index - 1) * keep)

    hook._should_compute_remaining_blocks = decide


@dataclass
class Row:
    label: str
    width: int
    height: int
    seconds: float  # median of the timed images
    first_seconds: float  # the first image after warm-up
    peak_gib: float | None  # peak GPU memory reserved (weights included)
    compiled: bool | None = None  # the timed images ran compiled graphs (the engine's metrics)
    steps_computed: str | None = None
    invalid: bool = False  # NaN / infinite pixels: timed, no image
    psnr_db: float | None = None
    ssim: float | None = None
    speedup: float | None = None
    floor_percent: float | None = None
    image_file: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Run:
    """One preset measured by one command."""

    label: str  # the preset, "-forced" when --force-skip was used
    variant: str
    gpu: str
    options: list[str]
    skipped: dict[str, str]
    attention: str | None
    forced_skip: float | None
    cold_start_s: float
    restart: dict | None = None
    rows: list[Row] = field(default_factory=list)


def engine_for(variant: str, pipe, args):
    """(a function making one image as an array, the engine or None, options, skipped, attention)."""
    if variant == "eager":
        def plain(width, height, seed):
            with torch.inference_mode():
                pixels = pipe(PROMPT, width=width, height=height, num_inference_steps=args.steps,
                              guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS, output_type="np",
                              generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            if not np.isfinite(pixels).all():
                raise InvalidImage()
            return (pixels * 255).round().astype(np.uint8)
        return plain, None, ["bf16"], {}, "native"
    no_compile = args.smoke and not args.compile_on_cpu
    overrides = {"speed_compile": False} if no_compile else {}
    warmup = ",".join(f"{w}x{h}" for w, h in args.sizes)
    settings = Settings(speed_preset=variant, speed_warmup_sizes=warmup, speed_compile_cache_dir=args.cache_dir,
                        device=args.device, **overrides)
    speed = apply_speed(pipe, plan_speed(settings.speed, settings.model, args.device))
    engine = FluxEngine(pipe, max_sequence_length=TEXT_TOKENS, description=variant, speed=speed)
    speed.warm_up(engine.generate)

    def generate(width, height, seed):
        return np.asarray(engine.generate(GenerationParams(PROMPT, width, height, args.steps, seed, GUIDANCE)))
    skipped = {**speed.plan.skipped, **({"compile": "off in --smoke (add --compile-on-cpu)"} if no_compile else {})}
    return generate, engine, speed.plan.options.enabled(), skipped, engine.metrics()["attention_backend"]


def measure(variant: str, args, gpu: str, http: dict | None) -> Run:
    release()
    started = time.perf_counter()
    pipe = build_pipeline(args)
    generate, engine, options, skipped, attention = engine_for(variant, pipe, args)
    forced = args.force_skip if "step_cache" in options else None
    if forced is not None:
        force_step_skip(pipe.transformer, forced)
    elif args.force_skip is not None:
        print(f"  {variant} has no step cache: --force-skip does not apply", flush=True)
    label = variant + ("-forced" if forced is not None else "")
    counter = StepCounter(pipe.transformer)
    run = Run(label, variant, gpu, options, skipped, attention, forced, cold_start_s=0.0)
    for index, (width, height) in enumerate(args.sizes):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        image, first = timed(partial(generate, width, height, SEED))
        if index == 0:
            run.cold_start_s = time.perf_counter() - started
        counter.take()
        seconds = [timed(partial(generate, width, height, SEED))[1] for _ in range(args.repeats)]
        peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
        compiled = engine.metrics().get("compiled") if engine is not None else False
        steps = counter.take()
        if steps and forced is not None:
            steps += " forced"
        run.rows.append(Row(label, width, height, statistics.median(seconds), first, peak, compiled=compiled,
                            steps_computed=steps, invalid=image is None, image=image))
        print(f"  {label} {width}x{height}: {statistics.median(seconds):.3f} s/image (first {first:.1f} s)"
              + (", NaN image" if image is None else ""), flush=True)
    if http is not None and engine is not None:
        http.update(http_latency(engine, args))
    del generate, engine, pipe, counter
    torch._dynamo.reset()
    release()
    return run


def restart_command(variant: str, args) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--restart-child", "--preset", variant,
               "--sizes", ",".join(f"{w}x{h}" for w, h in args.sizes), "--steps", str(args.steps),
               "--device", args.device, "--cache-dir", str(args.cache_dir)]
    if args.smoke:
        command.append("--smoke")
    if args.compile_on_cpu:
        command.append("--compile-on-cpu")
    if args.model:
        command += ["--model", args.model, "--base-model", args.base_model]
    return command


def restart_in_fresh_process(variant: str, args) -> dict:
    """What a server restart costs: a new process with the same compile cache, until its first image."""
    timeout = args.restart_timeout
    if args.time_limit is not None:  # leave a few seconds to write the results
        timeout = min(timeout, args.time_limit - (time.time() - STARTED_AT) - 10)
        if timeout < 30:
            print("  restart skipped: --time-limit leaves no time for it", flush=True)
            return {"error": "skipped: no time left"}
    if torch.cuda.is_available():  # the child needs the room the measured pipeline had
        print(f"  GPU memory still held here: {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    spawned = time.time()
    try:
        run = subprocess.run([*restart_command(variant, args), "--spawned-at", repr(spawned)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  restart in a fresh process ran past {timeout:.0f} s", flush=True)
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESTART ")]
    if run.returncode != 0 or not lines:
        tail = (run.stdout + run.stderr)[-2000:]
        print(f"  restart in a fresh process failed (exit {run.returncode}):\n{tail}", flush=True)
        return {"error": f"exit {run.returncode}"}
    result = json.loads(lines[-1][len("RESTART "):])
    print(f"  restart ({variant}, fresh process, warm cache): {result['process_s']:.1f} s to the first image",
          flush=True)
    return result


def restart_child(args) -> int:
    """The fresh process of a restart: weights, the preset, warm-up from the cache, one image."""
    started = time.perf_counter()
    pipe = build_pipeline(args)
    weights_s = time.perf_counter() - started
    generate, engine, *_ = engine_for(args.presets[0], pipe, args)
    ready_s = time.perf_counter() - started - weights_s
    _, first_image_s = timed(partial(generate, *args.sizes[0], SEED))
    spawned = args.spawned_at or IMPORTED_AT
    result = {"process_s": time.time() - spawned, "imports_s": IMPORTED_AT - spawned,
              "weights_s": weights_s, "ready_s": ready_s, "first_image_s": first_image_s,
              "compiled": engine.metrics().get("compiled") if engine is not None else False}
    print("RESTART " + json.dumps(result), flush=True)
    return 0


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
    return {"preset": engine.description, "width": width, "height": height, "http_s": http_s,
            "engine_s": engine_s, "overhead_s": http_s - engine_s, "metrics": metrics}


# -- results across commands ---------------------------------------------------------------------

def run_to_json(run: Run) -> dict:
    return {**{k: v for k, v in asdict(run).items() if k != "rows"},
            "rows": [{k: v for k, v in asdict(row).items() if k != "image"} for row in run.rows]}


def run_from_json(data: dict) -> Run:
    rows = [Row(**row) for row in data.pop("rows")]
    return Run(**data, rows=rows)


def load_runs(path: Path | None, gpu: str) -> list[Run]:
    if path is None or not path.is_file():
        return []
    runs = [run_from_json(item) for item in json.loads(path.read_text()).get("runs", [])]
    other = {run.gpu for run in runs} - {gpu}
    if other:
        print(f"note: {path} also holds runs on {', '.join(sorted(other))}; those are left out here", flush=True)
    return [run for run in runs if run.gpu == gpu]


def merged(previous: list[Run], current: list[Run]) -> list[Run]:
    """Earlier commands' runs, a rerun of the same preset and sizes replacing the old one."""
    key = lambda run: (run.label, tuple((row.width, row.height) for row in run.rows))  # noqa: E731
    replaced = {key(run) for run in current}
    return [run for run in previous if key(run) not in replaced] + current


def save_images(runs: list[Run], path: Path) -> None:
    folder = path.with_name(path.stem + "-images")
    for run in runs:
        for row in run.rows:
            if row.image is not None:
                folder.mkdir(parents=True, exist_ok=True)
                name = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{row.label}-{row.width}x{row.height}") + ".png"
                Image.fromarray(row.image).save(folder / name)
                row.image_file = str((folder / name).relative_to(path.parent))


def image_of(row: Row, base: Path | None) -> np.ndarray | None:
    if row.image is None and row.image_file and base is not None and (base / row.image_file).is_file():
        row.image = np.asarray(Image.open(base / row.image_file).convert("RGB"))
    return row.image


def fill_comparisons(runs: list[Run], floors: dict, steps: int, base: Path | None) -> None:
    rows = {(row.label, row.width, row.height): row for run in runs for row in run.rows}
    for run in runs:
        fp8 = "fp8" in run.options
        for row in run.rows:
            eager = rows.get(("eager", row.width, row.height))
            if eager is not None:
                row.speedup = eager.seconds / row.seconds
            per_step = floors.get((row.width, row.height, fp8))
            if per_step:
                row.floor_percent = 100 * per_step * steps / row.seconds
            # Against quality's image (quality's against eager's), or eager's when quality was not measured.
            reference = rows.get(("quality", row.width, row.height)) if run.variant != "quality" else None
            reference = reference or rows.get(("eager", row.width, row.height))
            if reference is None or reference is row or run.variant == "eager":
                continue
            mine, theirs = image_of(row, base), image_of(reference, base)
            if mine is not None and theirs is not None and mine.shape == theirs.shape:
                row.psnr_db, row.ssim = psnr(mine, theirs), ssim(mine, theirs)


# -- report --------------------------------------------------------------------------------------

def fmt(value, pattern: str, empty: str = "–") -> str:
    return empty if value is None else pattern.format(value)


def report(runs: list[Run], http: dict | None, header: dict, args) -> str:
    lines = [f"# fluxserve speed: {header['gpu']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| preset | size | s/image | images/h | × eager | % of floor | peak GPU GiB | compiled "
              "| first image s | steps computed | PSNR dB | SSIM |", "|---" * 12 + "|"]
    order = {name: index for index, name in enumerate(VARIANTS)}
    for run in sorted(runs, key=lambda run: (order.get(run.variant, 9), run.label)):
        for row in run.rows:
            quality = ("NaN image", "–") if row.invalid else (fmt(row.psnr_db, "{:.1f}"), fmt(row.ssim, "{:.4f}"))
            lines.append(
                f"| {row.label} | {row.width}×{row.height} | {row.seconds:.3f} | {3600 / row.seconds:,.0f} "
                f"| {fmt(row.speedup, '{:.2f}×')} | {fmt(row.floor_percent, '{:.0f} %')} "
                f"| {fmt(row.peak_gib, '{:.1f}')} | {fmt(row.compiled, '{}')} | {row.first_seconds:.1f} "
                f"| {row.steps_computed or '–'} | {quality[0]} | {quality[1]} |"
            )
    lines += ["", "| preset | options applied | attention | skipped | cold start s | restart s (fresh process, "
              "warm cache: imports + weights + ready + first image) |", "|---|---|---|---|---|---|"]
    for run in runs:
        skipped = "; ".join(f"{name}: {why}" for name, why in run.skipped.items()) or "–"
        restart = run.restart or {}
        restart_text = (f"{restart['process_s']:.1f} ({restart['imports_s']:.1f} + {restart['weights_s']:.1f} + "
                        f"{restart['ready_s']:.1f} + {restart['first_image_s']:.1f})" if "process_s" in restart
                        else restart.get("error", "–"))
        lines.append(f"| {run.label} | {', '.join(run.options) or '–'} | {run.attention or '–'} | {skipped} "
                     f"| {run.cold_start_s:.1f} | {restart_text} |")
    if http:
        lines += ["", f"HTTP (v1, {http['width']}×{http['height']}, preset {http['preset']}, metrics say "
                  f"{http['metrics'].get('speed_preset')}): {http['http_s']:.3f} s through the server, "
                  f"{http['engine_s']:.3f} s engine only, overhead {http['overhead_s'] * 1000:.0f} ms "
                  f"(server metrics: inference {http['metrics']['inference_time']} s, "
                  f"encode {http['metrics']['encode_time']} s, queue {http['metrics']['queue_time']} s)"]
    lines += ["", *targets(runs, args)]
    return "\n".join(lines) + "\n"


def targets(runs: list[Run], args) -> list[str]:
    if args.smoke or args.steps != 25:
        return ["Targets (H100, 25 steps) are checked only on full runs."]
    at_1024 = {row.label: row for run in runs for row in run.rows if (row.width, row.height) == (1024, 1024)}
    lines = ["Targets (1024², 25 steps unless said):"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for preset, limit in TARGETS_1024.items():
        for label in (preset, f"{preset}-forced"):
            row = at_1024.get(label)
            if row is not None:
                note = " (step skipping forced)" if label.endswith("-forced") else ""
                nan = ", but a NaN image" if row.invalid else ""
                lines.append(f"- {preset} ≤ {limit} s{note}: {row.seconds:.3f} s{nan}, "
                             f"{verdict(row.seconds <= limit and not row.invalid)}")
    preset, factor = TARGET_SPEEDUP
    if preset in at_1024 and at_1024[preset].speedup is not None:
        speedup = at_1024[preset].speedup
        lines.append(f"- {preset} ≥ {factor:g}× eager: {speedup:.2f}×, {verdict(speedup >= factor)}")
    for run in runs:
        if run.restart and "process_s" in run.restart:
            seconds = run.restart["process_s"]
            lines.append(f"- cold start with a warm cache ≤ {TARGET_RESTART_S:g} s ({run.label}, "
                         f"{run.rows[0].width}²): {seconds:.1f} s, {verdict(seconds <= TARGET_RESTART_S)}")
    for run in runs:
        for row in run.rows:
            if (row.width, row.height) == (2048, 2048) and row.peak_gib is not None:
                used = row.peak_gib * 2**30
                lines.append(f"- 2048² within 80 GB ({row.label}): {used / 1e9:.1f} GB peak reserved, "
                             f"{verdict(used <= TARGET_MEMORY_BYTES and not row.invalid)}")
    return lines if len(lines) > 1 else ["No target measured yet (see bench/GPU.md)."]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", dest="presets", default=None,
                        help=f"one of {', '.join(VARIANTS)} (a comma list runs them in turn; default with "
                             "--smoke: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, tiny sizes: checks the script")
    parser.add_argument("--sizes", default=None, help="square sizes or WxH, all warmed up (default 1024)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    parser.add_argument("--repeats", type=int, default=None, help="timed images per size (default 3)")
    parser.add_argument("--force-skip", type=float, default=None, metavar="FRACTION",
                        help="step cache: skip this share of the steps, evenly spread (random weights)")
    parser.add_argument("--model", help="real weights (repo id, folder, .safetensors) instead of random ones")
    parser.add_argument("--base-model", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="compile cache, kept between commands (default: <tmp>/fluxserve-bench-cache)")
    parser.add_argument("--restart", action=argparse.BooleanOptionalAction, default=None,
                        help="measure a restart in a fresh process (default: for compiled presets, not in --smoke)")
    parser.add_argument("--restart-timeout", type=float, default=480)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds this command may take: the restart gets what is left (a lent GPU's limit)")
    parser.add_argument("--http", action="store_true", help="also time one image through the HTTP server")
    parser.add_argument("--compile-on-cpu", action="store_true", help="with --smoke: compile too (slow)")
    parser.add_argument("--peak-tflops-bf16", type=float)
    parser.add_argument("--peak-tflops-fp8", type=float)
    parser.add_argument("--results", type=Path,
                        help="JSON kept across commands (with a .md of the table and the images beside it)")
    parser.add_argument("--json", type=Path, help="write this command's results as JSON here")
    parser.add_argument("--save", action="store_true", help="also write the table to bench/results/<gpu>-<time>.md")
    parser.add_argument("--restart-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smoke = args.smoke
    if args.presets is None:
        if not smoke:
            parser.error("--preset is required (one per command on a GPU; see bench/GPU.md)")
        args.presets = ",".join(VARIANTS)
    args.presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in args.presets if p not in VARIANTS]
    if unknown:
        parser.error(f"unknown preset {', '.join(unknown)}; use {', '.join(VARIANTS)}")
    if args.force_skip is not None and not 0 <= args.force_skip < 1:
        parser.error("--force-skip is a fraction in [0, 1)")
    args.device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.steps = args.steps or (3 if smoke else 25)
    args.repeats = args.repeats or (1 if smoke else 3)
    args.sizes = [parse_size(s) for s in (args.sizes or ("128" if smoke else "1024")).split(",")]
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
    temporary = None
    if args.cache_dir is None:
        if args.smoke:  # each smoke run starts cold
            temporary = tempfile.TemporaryDirectory(prefix="fluxserve-compile-")
            args.cache_dir = Path(temporary.name)
        else:
            args.cache_dir = Path(tempfile.gettempdir()) / "fluxserve-bench-cache"
    if args.restart_child:
        return restart_child(args)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    header = environment(args, gpu)
    bf16_peak, fp8_peak = peak_tflops(gpu, args.peak_tflops_bf16, args.peak_tflops_fp8)
    floors = {}
    config = transformer_config(args)
    for width, height in args.sizes:
        linear, attention = step_flops(config, width, height)
        header[f"FLOPs per step {width}×{height}"] = f"{(linear + attention) / 1e12:.4g} TFLOP " \
                                                    f"({attention / 1e12:.4g} attention)"
        if bf16_peak:
            floors[(width, height, False)] = (linear + attention) / (bf16_peak * 1e12)
            header[f"bf16 floor {width}×{height}"] = f"{floors[(width, height, False)] * args.steps:.2f} s"
        if bf16_peak and fp8_peak:
            floors[(width, height, True)] = linear / (fp8_peak * 1e12) + attention / (bf16_peak * 1e12)
            header[f"fp8 floor {width}×{height}"] = f"{floors[(width, height, True)] * args.steps:.2f} s"
    http: dict | None = {} if args.http else None
    runs: list[Run] = []
    previous = load_runs(args.results, gpu)
    base = args.results.parent if args.results else None

    def write_results(text: str | None = None) -> None:  # after each step: a command cut short keeps its rows
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            save_images(runs, args.results)
            all_runs = merged(previous, runs)
            args.results.write_text(json.dumps({"environment": header, "runs": [run_to_json(r) for r in all_runs]},
                                               indent=2, default=str))
            if text is not None:
                args.results.with_suffix(".md").write_text(text)

    for variant in args.presets:
        print(f"{variant} on {gpu} ...", flush=True)
        run = measure(variant, args, gpu, http if variant == args.presets[-1] else None)
        runs.append(run)
        write_results()
        restart = args.restart if args.restart is not None else ("compile" in run.options and not args.smoke)
        if restart and variant != "eager":
            run.restart = restart_in_fresh_process(variant, args)
            write_results()
    all_runs = merged(previous, runs)
    fill_comparisons(all_runs, floors, args.steps, base)
    text = report(all_runs, http or None, header, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"environment": header, "http": http or None,
                                         "runs": [run_to_json(run) for run in runs]}, indent=2, default=str))
    write_results(text)
    if args.save:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-") + datetime.now().strftime("-%Y%m%d-%H%M")
        (out / f"{stem}.md").write_text(text)
        print(f"saved bench/results/{stem}.md")
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
