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
from fluxserve.engine.optimize import fp8_eligible, repeated_blocks
from fluxserve.engine.speed import PRESETS, Machine, choose_attention_backend, parse_sizes, plan_speed
from fluxserve.engine.vae_tiling import decode_bytes, needs_vae_tiling

from conftest import SLUG, wait_status

CPU = Machine(device="cpu")
H100 = Machine(device="cuda", capability=(9, 0), modules=frozenset({"torchao", "triton"}),
               attention=frozenset({"_flash_3", "flash"}))
A100 = Machine(device="cuda", capability=(8, 0), modules=frozenset({"torchao", "triton"}),
               attention=frozenset({"flash"}))
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


def test_attention_backend_choice():
    assert choose_attention_backend(CPU) == "native"
    assert choose_attention_backend(H100) == "_flash_3"
    assert choose_attention_backend(A100) == "flash"  # FA3 is Hopper-only
    ada_with_fa3 = Machine(device="cuda", capability=(8, 9), attention=frozenset({"_flash_3"}))
    assert choose_attention_backend(ada_with_fa3) == "native"
    assert choose_attention_backend(Machine(device="cuda", capability=(9, 0))) == "native"  # PyTorch SDPA
    assert "flash_attn_3" in plan(A100, speed_attention="_flash_3").skipped["attention"]
    assert "unknown attention backend 'fa9'" in plan(H100, speed_attention="fa9").skipped["attention"]


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


@pytest.mark.parametrize("switch", [{"speed_fuse_qkv": True}, {"speed_channels_last_vae": True},
                                    {"speed_attention": "native"}, {"speed_attention": "auto"}])
def test_lossless_options_keep_the_image(tiny_model, reference, switch):
    engine = engine_with(tiny_model, **switch)
    assert engine.speed.plan.options.enabled()
    assert np.abs(np.asarray(engine.generate(PARAMS)).astype(int) - reference).max() <= 1


def test_quality_preset_compiles_and_keeps_the_image(tiny_model, reference, tmp_path):
    # quality without bf16, so that the comparison with float32 diffusers is about compilation alone.
    engine = load_engine(Settings(model=str(tiny_model), data_dir=tmp_path, speed_preset="quality",
                                  speed_bf16=False, speed_warmup_sizes="128x128"))
    assert engine.speed.plan.options.compile and engine.speed.compiled
    assert any((tmp_path / "compile-cache").iterdir())  # kernels kept on disk for the next start
    assert np.abs(np.asarray(engine.generate(PARAMS)).astype(int) - reference).max() <= 2
    assert engine.speed.metrics()["speed_options"][-1] == "compile"


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


def test_fp8_targets_the_blocks_linear_layers(tiny_model, plain):
    transformer = plain.pipeline.transformer
    eligible = [m for block in repeated_blocks(transformer) for m in block.modules() if fp8_eligible(m)]
    assert eligible and all(isinstance(m, torch.nn.Linear) for m in eligible)
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
    odd = np.asarray(engine.generate(GenerationParams("a stone bridge", 200, 136, steps=2, seed=3, guidance=3.5)))
    assert odd.shape == (136, 200, 3)  # a size that was not warmed up compiles on first use
