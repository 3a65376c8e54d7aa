"""The engine against diffusers itself, and the three ways of naming a model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from fluxserve.config import Settings
from fluxserve.engine import Engine, GenerationParams, load_engine
from fluxserve.engine.loading import ModelLoadError, ModelSource

from conftest import SLUG


@pytest.fixture(scope="module")
def reference(tiny_model):
    pipe = FluxPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(Settings(model=str(tiny_model)))


def direct(pipe, prompt, width, height, steps, guidance, seed):
    return pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.mark.parametrize(("width", "height", "seed"), [(128, 128, 0), (256, 192, 1184522), (160, 320, 7)])
def test_euler_is_pixel_identical_to_diffusers(engine, reference, width, height, seed):
    params = GenerationParams("a stone bridge", width, height, steps=4, seed=seed, guidance=3.5)
    ours = np.asarray(engine.generate(params))
    theirs = np.asarray(direct(reference, "a stone bridge", width, height, 4, 3.5, seed))
    assert ours.shape == (height, width, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(("width", "height", "seed"), [(128, 128, 3), (256, 128, 1184522), (144, 208, 42)])
def test_euler_png_over_http_is_pixel_identical_to_diffusers(http, reference, width, height, seed):
    body = {"positivePrompt": "a stone bridge", "width": width, "height": height, "steps": 4, "seed": seed,
            "CFGScale": 3.5, "outputFormat": "PNG", "scheduler": "Euler"}
    response = http.post(f"/v1/{SLUG}", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    ours = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert np.array_equal(ours, np.asarray(direct(reference, "a stone bridge", width, height, 4, 3.5, seed)))


def test_odd_size_is_center_crop_of_padded_reference(engine, reference):
    ours = np.asarray(engine.generate(GenerationParams("a kite", 200, 136, steps=3, seed=5, guidance=7)))
    padded = np.asarray(direct(reference, "a kite", 208, 144, 3, 7, 5))
    assert ours.shape == (136, 200, 3)
    assert np.array_equal(ours, padded[4:140, 4:204])


def test_progress_callback_sees_every_step(engine):
    seen = []
    params = GenerationParams("p", 128, 128, steps=5, seed=1, guidance=1)
    engine.generate(params, on_step=lambda s, t: seen.append((s, t)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_single_file_transformer_on_top_of_base_folder(tmp_path, tiny_model, engine):
    from fluxserve.engine.tiny import build_tiny_pipeline

    # A "fine-tune": the same architecture with other weights, shipped as one .safetensors file.
    finetune = build_tiny_pipeline(seed=123).transformer
    checkpoint = tmp_path / "finetune.safetensors"
    from safetensors.torch import save_file

    save_file(finetune.state_dict(), checkpoint)
    source = ModelSource.parse(str(checkpoint), base_model=str(tiny_model))
    assert source.kind == "single_file" and source.base == str(tiny_model)
    tuned = load_engine(Settings(model=str(checkpoint), base_model=str(tiny_model)))
    for name, tensor in finetune.state_dict().items():
        assert torch.equal(tuned.pipeline.transformer.state_dict()[name], tensor), name
    params = GenerationParams("same prompt", 128, 128, steps=2, seed=3, guidance=3.5)
    assert not np.array_equal(np.asarray(tuned.generate(params)), np.asarray(engine.generate(params)))


def test_model_source_kinds(tmp_path, tiny_model):
    assert ModelSource.parse(str(tiny_model), "base").kind == "folder"
    repo = "black-forest-labs/FLUX.1-dev"
    assert ModelSource.parse(repo, "base") == ModelSource("repo", repo)
    with pytest.raises(ModelLoadError, match="not found"):
        ModelSource.parse(str(tmp_path / "missing.safetensors"), "base")
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        ModelSource.parse(str(tmp_path), "base")


def test_unreachable_repo_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="FLUXSERVE_MODEL"):
        load_engine(Settings(model="no-such-org/no-such-flux-model"))


def test_tiny_model_is_deterministic(tmp_path):
    from fluxserve.engine.tiny import save_tiny_model

    a = save_tiny_model(tmp_path / "a")
    b = save_tiny_model(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_engine_describes_itself(engine, tiny_model):
    assert isinstance(engine, Engine) and engine.description == str(tiny_model)
