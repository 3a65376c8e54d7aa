"""Speed options: how presets resolve on each kind of machine, and each option on the tiny model.

Lossless options must leave the image as it was (up to kernel rounding); lossy ones must keep the
output contract (size, determinism). Options that need an NVIDIA GPU are skipped here with a reason,
and run in the GPU-only tests at the end when a suitable GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxserve.config import Settings
from fluxserve.engine import GenerationCancelled, GenerationParams, load_engine
from fluxserve.engine import flux as flux_engine
from fluxserve.engine.optimize import AppliedSpeed, fp8_eligible, repeated_blocks
from fluxserve.engine.preview import LatentPreviews
from fluxserve.engine.speed import (
    PRESETS,
    Machine,
    attention_candidates,
    choose_attention_backend,
    parse_sizes,
    plan_speed,
    probe_attention,
    probe_attention_backends,
)
from fluxserve.engine.vae_tiling import decode_bytes, needs_vae_tiling

from conftest import SLUG, wait_status

CPU = Machine(device="cpu")
# `attention`: the backends that passed the start-up probe.
H100 = Machine(device="cuda", capability=(9, 0), modules=frozenset({"torchao", "triton"}),
               attention=frozenset({"_flash_3", "_native_cudnn", "flash"}))
A100 = Machine(device="cuda", capability=(8, 0), modules=frozenset({"torchao", "triton"}),
               attention=frozenset({"flash", "_native_cudnn"}))
PARAMS = GenerationParams("a stone bridge", 128, 128, steps=4, seed=11, guidance=3.5)


def plan(machine: Machine, **flat):
    settings = Settings(**flat)
    return plan_speed(settings.speed, settings.model, machine.device, machine)


# -- choosing options ----------------------------------------------------------------------------

def test_auto_preset_is_off_on_cpu_and_quality_on_cuda():
    assert plan(CPU).preset == "off" and plan(CPU).options == PRESETS["off"]
    on_gpu = plan(H100)
    assert on_gpu.preset == "quality"
    assert on_gpu.options.enabled() == ["bf16", "fuse_qkv", "attention=_flash_3", "channels_last_vae", "compile"]
    assert on_gpu.compile_mode == "max-autotune-no-cudagraphs"
    assert plan(CPU, speed_compile=True).compile_mode == "default"


def test_presets_build_on_each_other_on_an_h100():
    balanced, turbo = plan(H100, speed_preset="balanced"), plan(H100, speed_preset="turbo")
    assert balanced.options.fp8 and not balanced.options.step_cache and not balanced.skipped
    assert turbo.options.fp8 and turbo.options.step_cache
    assert turbo.metrics() == {"speed_preset": "turbo", "speed_options": [
        "bf16", "fuse_qkv", "attention=_flash_3", "channels_last_vae", "compile", "fp8", "step_cache"]}


def test_cuda_only_options_are_skipped_on_cpu_with_a_reason():
    turbo = plan(CPU, speed_preset="turbo", speed_attention="_flash_3")
    assert not turbo.options.fp8 and "compute capability 8.9" in turbo.skipped["fp8"]
    assert turbo.options.attention == "default" and "NVIDIA GPU" in turbo.skipped["attention"]
    assert turbo.options.step_cache and turbo.options.compile  # these run anywhere
    assert "fp8 skipped" in turbo.describe()


def test_fp8_needs_ada_or_newer_and_torchao():
    assert "compute capability 8.9" in plan(A100, speed_preset="balanced").skipped["fp8"]
    no_torchao = Machine(device="cuda", capability=(9, 0), modules=frozenset({"triton"}))
    assert "fluxserve[speed]" in plan(no_torchao, speed_preset="balanced").skipped["fp8"]


def test_switches_override_the_preset():
    custom = plan(H100, speed_preset="quality", speed_compile=False, speed_fp8=True, speed_attention="native")
    assert not custom.options.compile and custom.options.fp8 and custom.options.attention == "native"
    assert plan(CPU, speed_preset="off", speed_fuse_qkv=True).options.enabled() == ["fuse_qkv"]


def test_explicit_dtype_wins_over_bf16():
    fp16 = plan(H100, dtype="float16")
    assert not fp16.options.bf16 and "FLUXSERVE_DTYPE=float16" in fp16.skipped["bf16"]


def test_compile_needs_its_toolchain():
    no_triton = Machine(device="cuda", capability=(9, 0), modules=frozenset())
    assert "triton" in plan(no_triton).skipped["compile"]
    assert "C++ compiler" in plan(Machine(has_cxx=False), speed_compile=True).skipped["compile"]


def test_attention_auto_tries_fa3_then_cudnn_then_sdpa():
    assert attention_candidates("cuda", (9, 0)) == ["_flash_3", "_native_cudnn"]
    assert attention_candidates("cuda", (8, 9)) == ["_native_cudnn"]  # Ada: FA3 is Hopper-only
    assert attention_candidates("cuda", (8, 0)) == attention_candidates("cpu", None) == []

    def hopper(*passed):
        return Machine(device="cuda", capability=(9, 0), attention=frozenset(passed))

    assert choose_attention_backend(hopper("_flash_3", "_native_cudnn")) == "_flash_3"
    assert choose_attention_backend(hopper("_native_cudnn")) == "_native_cudnn"
    assert choose_attention_backend(hopper()) == "native"  # PyTorch SDPA
    assert choose_attention_backend(hopper("_flash_3"), half_precision=False) == "native"  # float32
    ada = Machine(device="cuda", capability=(8, 9), attention=frozenset({"_flash_3", "_native_cudnn"}))
    assert choose_attention_backend(ada) == "_native_cudnn"
    assert choose_attention_backend(A100) == choose_attention_backend(CPU) == "native"
    assert plan(H100).options.attention == "_flash_3"
    assert plan(H100, dtype="float32").options.attention == "native"
    assert "flash_attn_3" in plan(A100, speed_attention="_flash_3").skipped["attention"]
    assert "unknown attention backend 'fa9'" in plan(H100, speed_attention="fa9").skipped["attention"]
    broken = Machine(device="cuda", capability=(9, 0), attention_failures=(("sage", "RuntimeError: no kernel"),))
    reason = plan(broken, speed_attention="sage").skipped["attention"]
    assert "failed its probe on cuda: RuntimeError: no kernel" in reason


def test_attention_probe_runs_candidates_in_order_and_picks_sdpa_on_cpu():
    tried = []

    def fake_probe(name, device):
        tried.append(name)
        return None if name == "_native_cudnn" else "ImportError: no flash_attn_interface"

    usable, failures = probe_attention_backends("cuda", attention_candidates("cuda", (9, 0)), probe=fake_probe)
    assert tried == ["_flash_3", "_native_cudnn"] and usable == {"_native_cudnn"}
    assert choose_attention_backend(Machine(device="cuda", capability=(9, 0), attention=usable)) == "_native_cudnn"
    assert dict(failures) == {"_flash_3": "ImportError: no flash_attn_interface"}
    # The real probe on this CPU: SDPA passes, the Hopper candidates fail with a reason, so SDPA is chosen.
    assert probe_attention("native", "cpu") is None
    usable, failures = probe_attention_backends("cpu", attention_candidates("cuda", (9, 0)))
    assert not usable and "flash" in dict(failures)["_flash_3"].lower() and dict(failures)["_native_cudnn"]
    assert choose_attention_backend(Machine(device="cuda", capability=(9, 0), attention=usable)) == "native"
    assert choose_attention_backend(Machine.probe("cpu")) == "native"


def test_warmup_sizes_parse_and_round_up():
    assert parse_sizes("1024x1024, 1000x760,1024x1024") == ((1024, 1024), (1008, 768))
    assert parse_sizes("") == ()
    with pytest.raises(ValueError, match="WARMUP_SIZES"):
        parse_sizes("1024")


def test_vae_tiling_decision():
    assert not needs_vae_tiling(2048, 2048)  # CPU: no memory figure, no threshold
    assert needs_vae_tiling(2048, 2048, min_pixels=2048 * 2048)
    assert not needs_vae_tiling(1024, 1024, min_pixels=2048 * 2048)
    gib = 2**30
    assert decode_bytes(2048, 2048) == 16 * gib
    assert not needs_vae_tiling(2048, 2048, free_bytes=60 * gib)  # an 80 GB card with the model loaded
    assert needs_vae_tiling(2048, 2048, free_bytes=12 * gib)  # a 24 GB card with the model loaded
    assert needs_vae_tiling(2048, 2048, dtype_bytes=4, free_bytes=30 * gib)  # float32 needs twice as much


# -- each option on the tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(tiny_model):
    return load_engine(Settings(model=str(tiny_model), speed_preset="off"))


@pytest.fixture(scope="module")
def reference(plain):
    return np.asarray(plain.generate(PARAMS)).astype(int)


def engine_with(tiny_model, **speed):
    return load_engine(Settings(model=str(tiny_model), **{"speed_preset": "off", "speed_warmup_sizes": "", **speed}))


@pytest.mark.parametrize("switch", [{"speed_channels_last_vae": True},
                                    {"speed_attention": "native"}, {"speed_attention": "auto"}])
def test_lossless_options_keep_the_image(tiny_model, reference, switch):
    engine = engine_with(tiny_model, **switch)
    assert engine.speed.plan.options.enabled()
    assert np.abs(np.asarray(engine.generate(PARAMS)).astype(int) - reference).max() <= 1


UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def test_fused_qkv_drops_the_unfused_projections_and_keeps_the_image(tiny_model, reference):
    engine = engine_with(tiny_model, speed_fuse_qkv=True)
    attentions = [block.attn for block in repeated_blocks(engine.pipeline.transformer)]
    assert all(attn.fused_projections and isinstance(attn.to_qkv, torch.nn.Linear) for attn in attentions)
    assert not [name for attn in attentions for name in UNFUSED if hasattr(attn, name)]
    assert isinstance(engine.pipeline.transformer.transformer_blocks[0].attn.to_added_qkv, torch.nn.Linear)
    assert np.abs(np.asarray(engine.generate(PARAMS)).astype(int) - reference).max() <= 1


# Compiling the tiny model on CPU takes about 30 s: the compile tests share one engine. quality without
# bf16 (so that comparisons with float32 diffusers are about compilation alone), one warm-up size, and a
# recompile limit of 2: one size's worth of cache entries.
@pytest.fixture(scope="module")
def compiled(tiny_model, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("compiled")
    engine = load_engine(Settings(model=str(tiny_model), data_dir=data_dir, speed_preset="quality", speed_bf16=False,
                                  speed_warmup_sizes="128x128", speed_compile_recompile_limit=2))
    return engine, data_dir


@pytest.mark.compile
def test_quality_preset_compiles_and_keeps_the_image(compiled, reference):
    engine, data_dir = compiled
    assert engine.speed.plan.options.compile and engine.speed.compiled and engine.speed.warmed_up
    assert any((data_dir / "compile-cache").iterdir())  # kernels kept on disk for the next start
    assert np.abs(np.asarray(engine.generate(PARAMS)).astype(int) - reference).max() <= 2
    metrics = engine.metrics()
    assert metrics["speed_options"][-1] == "compile" and metrics["compiled"] is True
    assert metrics["attention_backend"] == "native"
    assert not torch._dynamo.config.suppress_errors  # errors are caught at warm-up, not hidden everywhere


@pytest.mark.compile
def test_sizes_not_warmed_up_run_uncompiled_past_the_recompile_limit(compiled):
    engine, _ = compiled
    from torch._dynamo.utils import counters

    assert torch._dynamo.config.recompile_limit == 2
    graphs = counters["stats"]["unique_graphs"]
    sizes = [(144, 128), (128, 160), (176, 144), (96, 112)]  # more new sizes than the limit allows
    for width, height in sizes:
        image = engine.generate(GenerationParams("a stone bridge", width, height, steps=2, seed=3, guidance=3.5))
        assert image.size == (width, height) and engine.metrics()["compiled"] is False
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled on a request
    engine.generate(GenerationParams("a stone bridge", 128, 128, steps=2, seed=3, guidance=3.5))
    assert engine.metrics()["compiled"] is True  # the warm-up size still runs its graphs


def test_a_compile_error_at_warm_up_serves_uncompiled_for_good(caplog):
    applied = AppliedSpeed(plan=plan(CPU, speed_compile=True, speed_warmup_sizes="64x64,96x96"),
                           compiled=[object()])  # stands in for compiled forwards: nothing runs them

    def failing(params):
        raise RuntimeError("inductor exploded")

    applied.warm_up(failing)
    assert not applied.plan.options.compile and "inductor exploded" in applied.plan.skipped["compile"]
    assert not applied.runs_compiled(64, 64) and not applied.warmed_up
    assert "serving uncompiled" in caplog.text
    nothing = AppliedSpeed(plan=plan(CPU, speed_compile=True, speed_warmup_sizes=""), compiled=[object()])
    nothing.warm_up(failing)
    assert not nothing.plan.options.compile and "no warm-up sizes" in nothing.plan.skipped["compile"]


def test_previews_every_nth_step_and_the_last(plain):
    events: list = []
    params = GenerationParams("a stone bridge", 64, 64, steps=6, seed=1, guidance=3.5)
    plain.generate(params, on_step=lambda step, total: events.append(step),
                   on_preview=lambda image: events.append(("preview", image.size)))
    assert plain.speed.plan.preview_every == 4
    assert events == [1, 2, 3, ("preview", (8, 8)), 4, 5, ("preview", (8, 8)), 6]
    previews = LatentPreviews(lambda image: None, 64, 64, 8, every=3)
    assert [step for step in range(8) if previews.wanted(step, 8)] == [2, 5, 7]


class Sink:
    """An `on_preview` with `watched()`: records what the engine asked and what it got."""

    def __init__(self, watching: bool) -> None:
        self.watching, self.asked, self.images = watching, 0, []

    def watched(self) -> bool:
        self.asked += 1
        return self.watching

    def __call__(self, image) -> None:
        self.images.append(image.size)


def test_previews_only_while_watched(plain):
    params = GenerationParams("a stone bridge", 64, 64, steps=6, seed=1, guidance=3.5)
    for watching, images in ((True, [(8, 8), (8, 8)]), (False, [])):
        sink = Sink(watching)
        plain.generate(params, on_preview=sink)
        assert sink.images == images and sink.asked == 2  # asked on the preview steps only (4th, last)
    # Unwatched, no latent is even copied: a copy of `None` would fail.
    previews = LatentPreviews(Sink(False), 64, 64, 8, every=2)
    for step in range(8):
        previews.after_step(step, 8, None)
    assert previews._pending == [] and previews.on_preview.asked == 4


def test_no_preview_work_without_a_callback(plain, monkeypatch):
    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("preview code ran without a preview callback")

    monkeypatch.setattr(flux_engine, "LatentPreviews", Refuse)
    steps: list = []
    plain.generate(GenerationParams("a stone bridge", 64, 64, steps=3, seed=1, guidance=3.5),
                   on_step=lambda step, total: steps.append(step))
    assert steps == [1, 2, 3]


def test_bf16_keeps_the_contract(tiny_model, reference):
    engine = engine_with(tiny_model, speed_bf16=True)
    assert engine.pipeline.transformer.dtype == torch.bfloat16
    first, again = (np.asarray(engine.generate(PARAMS)) for _ in range(2))
    assert first.shape == (128, 128, 3) and np.array_equal(first, again)
    assert np.abs(first.astype(int) - reference).mean() < 8  # rounding, not a different image


def count_tail_calls(engine) -> list:
    """Records each time the last single block really runs (the step cache skips it otherwise)."""
    tail = engine.pipeline.transformer.single_transformer_blocks[-1]
    calls, original = [], tail._diffusers_hook.get_hook("fbc_block_hook").fn_ref.original_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tail._diffusers_hook.get_hook("fbc_block_hook").fn_ref.original_forward = counting
    return calls


def test_step_cache_skips_steps_and_keeps_the_contract(tiny_model):
    engine = engine_with(tiny_model, speed_step_cache=True, speed_step_cache_threshold=1.0)
    calls = count_tail_calls(engine)
    params = GenerationParams("a stone bridge", 128, 128, steps=6, seed=11, guidance=3.5)
    first = np.asarray(engine.generate(params))
    assert first.shape == (128, 128, 3) and 1 <= len(calls) < 6
    assert np.array_equal(first, np.asarray(engine.generate(params)))  # same request, same pixels


def test_cancelled_run_leaves_no_stale_cache(tiny_model):
    engine = engine_with(tiny_model, speed_step_cache=True, speed_step_cache_threshold=0.5)
    expected = np.asarray(engine.generate(PARAMS))

    def cancel_at_two(step, _total):
        if step == 2:
            raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        engine.generate(GenerationParams("another prompt", 128, 128, steps=4, seed=5, guidance=3.5),
                        on_step=cancel_at_two)
    assert np.array_equal(np.asarray(engine.generate(PARAMS)), expected)


def test_turbo_on_cpu_runs_what_it_can(tiny_model):
    engine = engine_with(tiny_model, speed_preset="turbo", speed_compile=False)
    assert engine.speed.metrics()["speed_preset"] == "turbo" and "fp8" in engine.speed.plan.skipped
    assert np.asarray(engine.generate(PARAMS)).shape == (128, 128, 3)


def test_vae_tiles_large_requests_only_and_restores(tiny_model, reference):
    engine = engine_with(tiny_model, speed_vae_tiling_min_pixels=160 * 160)
    vae, tiled = engine.pipeline.vae, []
    original = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: tiled.append(1) or original(*a, **k)
    assert np.abs(np.asarray(engine.generate(PARAMS)).astype(int) - reference).max() <= 1 and not tiled
    big = np.asarray(engine.generate(GenerationParams("a stone bridge", 256, 192, steps=2, seed=1, guidance=3.5)))
    assert big.shape == (192, 256, 3) and tiled and not vae.use_tiling


def test_result_metrics_name_the_preset(http):
    body = {"positivePrompt": "metrics", "width": 128, "height": 128, "steps": 2}
    request_id = http.post(f"/v2/{SLUG}", json=body).json()["request_id"]
    assert wait_status(http, request_id)["status"] == "COMPLETED"
    metrics = http.get(f"/v2/requests/{request_id}").json()["metrics"]
    assert metrics["speed_preset"] == "off" and metrics["speed_options"] == []
    assert metrics["compiled"] is False and metrics["attention_backend"] == "native"


def test_fp8_targets_the_blocks_linear_layers_but_not_adaln(tiny_model, plain):
    transformer = plain.pipeline.transformer
    named = [(name, m) for block in repeated_blocks(transformer) for name, m in block.named_modules()]
    eligible = [name for name, m in named if fp8_eligible(m, name)]
    assert eligible and all(isinstance(m, torch.nn.Linear) for name, m in named if name in eligible)
    assert {"attn.to_out.0", "ff.net.2", "proj_mlp", "proj_out"} <= set(eligible)
    # AdaLN modulation (one row per sample: the timestep embedding) stays in bf16.
    adaln = {name for name, m in named if isinstance(m, torch.nn.Linear) and name.endswith("linear")}
    assert adaln == {"norm1.linear", "norm1_context.linear", "norm.linear"} and not adaln & set(eligible)
    wide = torch.nn.Linear(3072, 18432)  # FLUX.1-dev's norm1.linear
    assert not fp8_eligible(wide, "norm1.linear") and not fp8_eligible(wide, "blocks.3.norm1_context.linear")
    assert fp8_eligible(torch.nn.Linear(3072, 9216), "attn.to_qkv") and fp8_eligible(wide, "ff.net.0.proj")
    assert not fp8_eligible(torch.nn.Linear(64, 24)) and not fp8_eligible(torch.nn.Conv2d(16, 16, 1))
    torchao = pytest.importorskip("torchao.quantization")
    assert torchao.Float8DynamicActivationFloat8WeightConfig(granularity=torchao.PerRow())


# -- on a GPU --------------------------------------------------------------------------------------

def fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not fp8_gpu(), reason="float8 needs an NVIDIA GPU with compute capability 8.9+")
@pytest.mark.parametrize("preset", ["quality", "balanced", "turbo"])
def test_presets_on_gpu_keep_the_contract(tiny_model, tmp_path, preset):
    engine = load_engine(Settings(model=str(tiny_model), data_dir=tmp_path, speed_preset=preset,
                                  speed_warmup_sizes="128x128"))
    assert not engine.speed.plan.skipped, engine.speed.plan.skipped
    first, again = (np.asarray(engine.generate(PARAMS)) for _ in range(2))
    assert first.shape == (128, 128, 3) and np.array_equal(first, again)
    assert engine.metrics()["compiled"] is True
    odd = np.asarray(engine.generate(GenerationParams("a stone bridge", 200, 136, steps=2, seed=3, guidance=3.5)))
    assert odd.shape == (136, 200, 3) and engine.metrics()["compiled"] is False  # not warmed up: eager
