"""Loading options real users need: LoRA adapters, dtype, memory modes; and honest engine failures."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fluxserve.config import Settings
from fluxserve.engine import GenerationParams, load_engine
from fluxserve.engine.errors import OutOfMemory
from fluxserve.engine.loading import ModelLoadError
from fluxserve.engine.lora import LoraSpec, parse_loras

from support.app import SLUG, running_app

PARAMS = GenerationParams("a stone bridge", 64, 64, steps=3, seed=5, guidance=3.5)


def image(engine, params: GenerationParams = PARAMS) -> np.ndarray:
    return np.asarray(engine.generate(params))


def engine_with(tiny_model, **settings):
    return load_engine(Settings(model=str(tiny_model), max_sequence_length=77, **settings))


@pytest.fixture(scope="module")
def plain_engine(tiny_model):
    return engine_with(tiny_model)


@pytest.fixture(scope="module")
def base_image(plain_engine) -> np.ndarray:
    return image(plain_engine)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> str:
    """A rank-4 LoRA (diffusers/PEFT key layout) on three of the tiny transformer's projections."""
    from fluxserve.engine.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline().transformer
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for target in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                   "single_transformer_blocks.0.proj_out"):
        layer = transformer.get_submodule(target)
        weights[f"transformer.{target}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator)
        weights[f"transformer.{target}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator)
    path = tmp_path_factory.mktemp("lora") / "tiny-lora.safetensors"
    save_file(weights, path)
    return str(path)


def test_lora_spec_parsing():
    assert parse_loras("") == []
    assert parse_loras("/m/a.safetensors:0.8, owner/repo ,C:\\loras\\b.safetensors") == [
        LoraSpec("/m/a.safetensors", 0.8), LoraSpec("owner/repo"), LoraSpec("C:\\loras\\b.safetensors")]


def test_lora_changes_the_image_and_scale_zero_is_the_base(tiny_model, tiny_lora, base_image):
    fused = engine_with(tiny_model, loras=tiny_lora)
    assert not np.array_equal(image(fused), base_image)
    half = engine_with(tiny_model, loras=f"{tiny_lora}:0.5")
    assert not np.array_equal(image(half), base_image) and not np.array_equal(image(half), image(fused))
    assert np.array_equal(image(engine_with(tiny_model, loras=f"{tiny_lora}:0")), base_image)
    # Fused and unloaded: the transformer is a plain model again (no adapter layers left per step).
    assert not any("lora" in name for name, _ in fused.pipeline.transformer.named_parameters())


def test_a_lora_that_does_not_load_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(ModelLoadError, match=r"Could not load LoRA .*missing.safetensors"):
        engine_with(tiny_model, loras=str(tmp_path / "missing.safetensors"))


def test_model_cpu_offload_gives_the_same_image(tiny_model, base_image):
    engine = engine_with(tiny_model, memory_mode="model_cpu_offload")
    assert hasattr(engine.pipeline.transformer, "_hf_hook")  # accelerate's offload hook is installed
    for _ in range(2):  # the second time after the hooks were reset
        # The same image up to float rounding: a few values differ by 1 of 255 on CPU.
        difference = np.abs(image(engine).astype(int) - base_image)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.001


def test_sequential_cpu_offload_is_installed(tiny_model, base_image):
    engine = engine_with(tiny_model, memory_mode="sequential_cpu_offload")
    weight = engine.pipeline.transformer.proj_out.weight
    assert weight.device.type == "meta"  # weights live off the device until their layer runs
    if not torch.cuda.is_available():
        # On a CPU-only machine accelerate's layer-by-layer streaming cannot run (the "move" to the CPU
        # is a no-op that confuses its tied-weight map); it is for GPUs.
        pytest.skip("sequential offload runs only with a CUDA device")
    assert np.array_equal(image(engine), base_image)


def test_vae_slicing_and_tiling(tiny_model, base_image):
    assert np.array_equal(image(engine_with(tiny_model, vae_slicing=True)), base_image)
    tiled = engine_with(tiny_model, vae_tiling=True)
    assert tiled.pipeline.vae.use_tiling
    big = GenerationParams("a stone bridge", 96, 96, steps=2, seed=5, guidance=3.5)  # > the tiny VAE's 32px tile
    assert image(tiled, big).shape == (96, 96, 3) and image(tiled, big).std() > 5


def test_bfloat16_on_cpu(tiny_model):
    engine = engine_with(tiny_model, dtype="bfloat16")
    assert engine.pipeline.transformer.dtype == torch.bfloat16
    assert image(engine).std() > 5


def test_out_of_memory_is_a_clear_failure_and_the_engine_recovers(plain_engine, base_image):
    engine = plain_engine

    def run_out_of_memory(step, total):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(OutOfMemory, match=r"out of GPU memory at 64x64.*MEMORY_MODE"):
        engine.generate(PARAMS, on_step=run_out_of_memory)
    assert np.array_equal(image(engine), base_image)


def test_a_model_that_fails_to_load_is_a_clear_start_up_error(tmp_path, tiny_model):
    """The app with the package's own engine loader: the failure is on /health, in 502s and in the log."""
    with running_app(tmp_path / "data", model=str(tiny_model), loras=str(tmp_path / "missing.safetensors"),
                     wait_ready=False) as srv, srv.http() as http:
        deadline = time.monotonic() + 120
        health = {}
        while health.get("engine") != "failed" and time.monotonic() < deadline:
            health = http.get("/health").json()
            time.sleep(0.05)
        assert health["engine"] == "failed" and "Could not load LoRA" in health["engine_error"]
        response = http.post(f"/v2/{SLUG}", json={"positivePrompt": "a cat"})
        assert response.status_code == 502 and "Could not load LoRA" in response.json()["error"]
        assert "Could not load LoRA" in srv.log()
