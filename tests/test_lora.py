"""LoRA per request: the `loras` field, the operator's registry, the tiny-LoRA maker, the engine applying
adapters without reloading the model (by name with an LRU, or in fixed slots when compiled), and the API
(`GET /v1/loras`, unknown names answered 400 before any job exists)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fluxserve.app.submit import SubmitHeaders, take_submit_options
from fluxserve.cli import app as cli_app
from fluxserve.config import Settings
from fluxserve.contract import GenerateRequest, RequestError, parse_request
from fluxserve.engine import GenerationParams, load_engine
from fluxserve.engine.fake import SleepingEngine
from fluxserve.engine.flux import FluxEngine
from fluxserve.engine.lora import (
    AdapterSlots,
    LoraRegistry,
    LoraUnavailable,
    NamedAdapters,
    UnknownLora,
    plan_for_request_loras,
)
from fluxserve.engine.protocol import LoraWeight
from fluxserve.engine.speed import SpeedOptions, SpeedPlan
from fluxserve.engine.tiny import TINY_LORA_TARGETS, save_tiny_lora, tiny_lora_weights
from fluxserve.failures import JobFailure

from support.app import SLUG, running_app, wait_status

PROMPT = "a stone bridge"


def params(*loras: LoraWeight, seed: int = 5) -> GenerationParams:
    return GenerationParams(PROMPT, 64, 64, steps=3, seed=seed, guidance=3.5, loras=loras)


def pixels(engine, *loras: LoraWeight) -> np.ndarray:
    return np.asarray(engine.generate(params(*loras)))


A, B, C = LoraWeight("a", 1.0), LoraWeight("b", 0.7), LoraWeight("c.v2", 1.5)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """Three adapters as an operator lays them out: two files (one with a dot in its name) and a folder."""
    directory = tmp_path_factory.mktemp("loras")
    save_tiny_lora(directory / "a.safetensors", rank=4, seed=1)
    save_tiny_lora(directory / "b", rank=8, seed=2)  # b/pytorch_lora_weights.safetensors
    save_tiny_lora(directory / "c.v2.safetensors", rank=2, seed=3)
    (directory / "notes.txt").write_text("not an adapter")
    (directory / ".hidden.safetensors").write_bytes(b"")
    return directory


def tiny_engine(tiny_model, **settings):
    return load_engine(Settings(model=str(tiny_model), max_sequence_length=77, **settings))


@pytest.fixture(scope="module")
def plain(tiny_model):
    """The tiny model with no per-request LoRAs configured at all."""
    return tiny_engine(tiny_model)


@pytest.fixture(scope="module")
def base(plain) -> np.ndarray:
    return pixels(plain)


@pytest.fixture(scope="module")
def engine(tiny_model, lora_dir):
    """Per-request LoRAs by name, at most two kept loaded."""
    return tiny_engine(tiny_model, lora_dir=str(lora_dir), lora_cache_size=2)


@pytest.fixture(scope="module")
def slotted(tiny_model, lora_dir):
    """Per-request LoRAs in fixed slots (as when compiled), here without compiling."""
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(tiny_model)
    return FluxEngine(pipeline, max_sequence_length=77, loras=LoraRegistry(lora_dir), lora_slots=True)


# -- the request field -----------------------------------------------------------------------------


@pytest.mark.parametrize(("loras", "message"), [
    ([{"name": "a"}] * 2, "listed once"),
    ([{"name": f"l{i}"} for i in range(4)], "at most 3"),
    ([{"name": ""}], "loras.0.name"),
    ([{"name": "a", "scale": 2.5}], "loras.0.scale"),
    ([{"name": "a", "scale": "1"}], "loras.0.scale"),
    ([{"name": "a", "path": "/etc/passwd"}], "Unknown field: loras.0.path"),
    ([{"scale": 1}], "loras.0.name: required"),
    ("a", "loras"),
])
def test_the_loras_field_is_validated(loras, message):
    with pytest.raises(RequestError, match=message):
        parse_request({"positivePrompt": "p", "loras": loras})


def test_the_loras_field_reaches_the_engine_also_from_a_stored_job():
    request = parse_request({"positivePrompt": "p", "loras": [{"name": "b", "scale": -0.5}, {"name": "a"}]})
    expected = (LoraWeight("b", -0.5), LoraWeight("a", 1.0))
    assert request.generation_params().loras == expected
    # The stores read parameters back unvalidated (model_construct): the adapters are plain dicts then.
    stored = GenerateRequest.model_construct(**request.model_dump())
    assert stored.generation_params().loras == expected
    older = {k: v for k, v in request.model_dump().items() if k != "loras"}  # a job stored before the field
    assert GenerateRequest.model_construct(**older).generation_params().loras == ()
    assert parse_request({"positivePrompt": "p"}).generation_params().loras == ()
    # Part of the request: an Idempotency-Key reused with other adapters is another request.
    one, other = ({"positivePrompt": "p", "loras": [{"name": name}]} for name in ("a", "b"))
    fingerprints = {take_submit_options(body, SubmitHeaders()).fingerprint for body in (one, other)}
    assert len(fingerprints) == 2


def test_the_request_schema_is_self_contained():
    schema = GenerateRequest.model_json_schema()
    assert "$defs" not in schema and "$ref" not in str(schema)
    item = schema["properties"]["loras"]["items"]
    assert item["required"] == ["name"] and item["additionalProperties"] is False
    assert schema["properties"]["loras"]["maxItems"] == 3


# -- the registry ----------------------------------------------------------------------------------


def test_the_registry_holds_the_directory_and_registered_adapters(lora_dir, tmp_path):
    registry = LoraRegistry(lora_dir)
    assert registry.names() == ["a", "b", "c.v2"]
    assert registry.path("b") == lora_dir / "b" / "pytorch_lora_weights.safetensors"
    assert [entry["name"] for entry in registry.describe()] == ["a", "b", "c.v2"]
    assert all(entry["bytes"] > 0 and set(entry) == {"name", "bytes"} for entry in registry.describe())
    with pytest.raises(UnknownLora, match=r"Unknown LoRA 'nope', '\.\./a'; registered LoRAs: a, b, c\.v2"):
        registry.check(["a", "nope", "../a"])
    registry.check([])
    # Entries registered by name (a models file) join the directory's, and win over one of the same name.
    extra = save_tiny_lora(tmp_path / "extra.safetensors", seed=9)
    registry.register("a", extra)
    registry.register("detail", tmp_path)  # a folder holding one .safetensors file
    assert registry.names() == ["a", "b", "c.v2", "detail"] and registry.path("a") == extra
    with pytest.raises(ValueError, match=r"not a \.safetensors file"):
        registry.register("bad", tmp_path / "missing")
    # Read afresh: an adapter dropped in the directory counts at once.
    save_tiny_lora(tmp_path / "fresh" / "new.safetensors")
    fresh = LoraRegistry(tmp_path / "fresh")
    assert fresh.names() == ["new"]
    save_tiny_lora(tmp_path / "fresh" / "newer.safetensors")
    assert fresh.names() == ["new", "newer"]


def test_without_adapters_the_answer_says_so_and_long_lists_are_cut(tmp_path):
    with pytest.raises(UnknownLora, match="no LoRA adapters registered"):
        LoraRegistry().check(["a"])
    assert not LoraRegistry().configured and LoraRegistry(tmp_path / "missing").names() == []
    registry = LoraRegistry(entries={f"l{i:03d}": save_tiny_lora(tmp_path / "one.safetensors") for i in range(60)})
    with pytest.raises(UnknownLora, match=r"l049, … \(60 in all; GET /v1/loras lists them\)"):
        registry.check(["zzz"])


def test_speed_options_that_remove_lora_targets_are_left_out(tmp_path):
    plan = SpeedPlan(preset="balanced", options=SpeedOptions(bf16=True, fuse_qkv=True, fp8=True, compile=True))
    assert plan_for_request_loras(plan, LoraRegistry()) is plan
    kept = plan_for_request_loras(plan, LoraRegistry(tmp_path))
    assert kept.options == SpeedOptions(bf16=True, compile=True)
    assert "q/k/v" in kept.skipped["fuse_qkv"] and "float8" in kept.skipped["fp8"]


# -- the tiny LoRA ---------------------------------------------------------------------------------


def test_tiny_lora_is_deterministic_and_made_from_the_cli(tmp_path):
    runner = CliRunner()
    for name, seed in (("one", 1), ("two", 1), ("three", 2)):
        result = runner.invoke(cli_app, ["tiny-lora", str(tmp_path / f"{name}.safetensors"), "--rank", "3",
                                         "--seed", str(seed)])
        assert result.exit_code == 0, result.output
    one, two, three = ((tmp_path / f"{name}.safetensors").read_bytes() for name in ("one", "two", "three"))
    assert one == two and one != three
    weights = tiny_lora_weights(rank=3, seed=1)
    assert len(weights) == 2 * len(TINY_LORA_TARGETS)
    assert weights["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (3, 32)
    assert weights["transformer.single_transformer_blocks.0.proj_out.lora_B.weight"].shape == (32, 3)
    assert runner.invoke(cli_app, ["tiny-lora", str(tmp_path / "dir")]).exit_code == 0
    assert (tmp_path / "dir" / "pytorch_lora_weights.safetensors").is_file()


# -- the engine, adapters by name ------------------------------------------------------------------


def test_a_lora_changes_the_image_and_the_next_job_without_one_is_the_base(engine, base):
    assert isinstance(engine.adapters, NamedAdapters)
    assert np.array_equal(pixels(engine), base)  # before any LoRA: the plain model's image
    with_a = pixels(engine, A)
    assert (with_a != base).mean() > 0.5  # visibly another image
    metrics = engine.metrics()
    assert metrics["loras"] == [{"name": "a", "scale": 1.0}] and metrics["lora_swap_seconds"] >= 0
    assert np.array_equal(pixels(engine), base)  # right after a LoRA job: bit-exact base
    assert "loras" not in engine.metrics()
    assert np.array_equal(pixels(engine, LoraWeight("a", 0.0)), base)  # scale 0 is no LoRA
    assert np.array_equal(pixels(engine, A), with_a)
    weaker = pixels(engine, LoraWeight("a", 0.5))
    assert not np.array_equal(weaker, with_a) and not np.array_equal(weaker, base)


def test_two_adapters_at_once_in_any_order_give_the_same_bytes(engine, base):
    both = pixels(engine, A, B)
    assert not np.array_equal(both, pixels(engine, A)) and not np.array_equal(both, pixels(engine, B))
    pixels(engine, C)
    assert np.array_equal(pixels(engine, B, A), both)  # name order, whatever the request's order
    assert np.array_equal(pixels(engine, LoraWeight("c.v2", 0), B, A), both)
    assert np.array_equal(pixels(engine), base)


def test_least_recently_used_adapters_are_unloaded_and_come_back_the_same(engine, base):
    first = pixels(engine, C)
    pixels(engine, A)
    pixels(engine, B)
    assert engine.adapters.loaded == ["a", "b"]  # c.v2 unloaded (two kept)
    pixels(engine, A)
    assert engine.metrics()["lora_load_seconds"] == 0 and engine.adapters.loaded == ["b", "a"]  # still loaded
    assert np.array_equal(pixels(engine, C), first)
    assert engine.metrics()["lora_load_seconds"] > 0 and engine.adapters.loaded == ["a", "c.v2"]
    assert np.array_equal(pixels(engine), base)


def test_an_adapter_replaced_on_disk_is_read_again(tiny_model, tmp_path, base):
    path = save_tiny_lora(tmp_path / "style.safetensors", seed=4)
    engine = tiny_engine(tiny_model, lora_dir=str(tmp_path))
    style = LoraWeight("style")
    before = pixels(engine, style)
    path.write_bytes(save_tiny_lora(tmp_path / "other" / "x.safetensors", seed=5).read_bytes())
    after = pixels(engine, style)
    assert not np.array_equal(before, after) and engine.metrics()["lora_load_seconds"] > 0
    assert np.array_equal(pixels(engine), base)


def test_an_adapter_that_cannot_be_applied_fails_the_job_cleanly(tiny_model, tmp_path, base):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_tiny_lora(tmp_path / "good.safetensors", seed=1)
    engine = tiny_engine(tiny_model, lora_dir=str(tmp_path))
    with pytest.raises(LoraUnavailable, match="LoRA 'broken' could not be loaded"):
        engine.generate(params(LoraWeight("broken")))
    with pytest.raises(JobFailure, match=r"Unknown LoRA 'gone'; registered LoRAs: broken, good"):
        engine.generate(params(LoraWeight("gone")))
    with pytest.raises(JobFailure, match="no LoRA adapters registered"):
        tiny_engine(tiny_model).generate(params(A))
    assert np.array_equal(pixels(engine), base)
    assert not np.array_equal(pixels(engine, LoraWeight("good")), base)


def test_start_up_fused_loras_still_work_beside_per_request_ones(tiny_model, lora_dir, base):
    fused_only = tiny_engine(tiny_model, loras=str(lora_dir / "a.safetensors"))
    both = tiny_engine(tiny_model, loras=str(lora_dir / "a.safetensors"), lora_dir=str(lora_dir))
    fused = pixels(fused_only)
    assert not np.array_equal(fused, base) and np.array_equal(pixels(both), fused)
    assert not np.array_equal(pixels(both, B), fused)
    assert np.array_equal(pixels(both), fused)


def test_the_fake_engine_takes_loras_too(tmp_path):
    image = SleepingEngine(0.0).generate(GenerationParams("p", 64, 48, steps=1, seed=1, guidance=1, loras=(A,)))
    assert image.size == (64, 48)


# -- the engine, adapters in slots (compiled) ------------------------------------------------------


def test_slots_give_the_base_exactly_and_the_same_bytes_whatever_ran_before(slotted, engine, base):
    assert isinstance(slotted.adapters, AdapterSlots) and slotted.adapters.rank == 8
    assert np.array_equal(pixels(slotted), base)
    with_a = pixels(slotted, A)
    # The same adapters as by name, up to rounding (zero-padded to the slots' rank).
    assert np.abs(with_a.astype(int) - pixels(engine, A)).max() <= 1 and not np.array_equal(with_a, base)
    assert np.array_equal(pixels(slotted), base)
    all_three = pixels(slotted, C, B, A)
    pixels(slotted, C)
    pixels(slotted, B, LoraWeight("c.v2", -1.0))
    assert np.array_equal(pixels(slotted, A, C, B), all_three)
    assert np.array_equal(pixels(slotted, A), with_a)
    assert np.array_equal(pixels(slotted, LoraWeight("b", 0.0)), base)
    assert slotted.metrics()["lora_swap_seconds"] >= 0


def test_an_adapter_that_does_not_fit_the_slots_fails_without_touching_them(tiny_model, tmp_path, base):
    from diffusers import FluxPipeline

    save_tiny_lora(tmp_path / "small.safetensors", rank=2, seed=1)
    engine = FluxEngine(FluxPipeline.from_pretrained(tiny_model), max_sequence_length=77,
                        loras=LoraRegistry(tmp_path), lora_slots=True)
    small = pixels(engine, LoraWeight("small"))
    save_tiny_lora(tmp_path / "large.safetensors", rank=6, seed=2)  # registered after start-up
    with pytest.raises(LoraUnavailable, match="rank 6 exceeds the slots' rank 2"):
        engine.generate(params(LoraWeight("small"), LoraWeight("large")))
    assert np.array_equal(pixels(engine, LoraWeight("small")), small)
    assert np.array_equal(pixels(engine), base)


@pytest.mark.compile
def test_compiled_slots_swap_adapters_without_recompiling(tiny_model, lora_dir, tmp_path, monkeypatch, base):
    """The real compile path (regional, fullgraph) with dynamo's eager backend, which compiles in seconds:
    after the warm-up no adapter swap compiles anything or misses a guard (every block call ran its graph)."""
    from torch._C._dynamo.eval_frame import set_guard_complete_hook
    from torch._dynamo.utils import counters

    compile_ = torch.compile

    def eager_backend(function, **options):
        options.pop("mode", None)
        return compile_(function, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", eager_backend)
    engine = tiny_engine(tiny_model, lora_dir=str(lora_dir), data_dir=tmp_path, speed_compile=True,
                         speed_warmup_sizes="64x64")
    assert isinstance(engine.adapters, AdapterSlots) and engine.speed.warmed_up
    guards = {True: 0, False: 0}

    def on_guard(hit):
        guards[bool(hit)] += 1
        return hit

    previous = set_guard_complete_hook(on_guard)
    try:
        graphs = counters["stats"]["unique_graphs"]
        compiled_base = pixels(engine)
        with_a = pixels(engine, A)
        for loras in ((A, B), (C,), (B, C, A), (LoraWeight("a", -0.5),)):
            pixels(engine, *loras)
            assert engine.metrics()["compiled"] is True
        assert np.array_equal(pixels(engine), compiled_base) and np.array_equal(pixels(engine, A), with_a)
        assert not np.array_equal(with_a, compiled_base)
        assert counters["stats"]["unique_graphs"] == graphs
        assert guards[False] == 0 and guards[True] > 0
    finally:
        set_guard_complete_hook(previous)
    assert np.abs(compiled_base.astype(int) - base).max() <= 1


# -- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model, lora_dir, engine):
    data = tmp_path_factory.mktemp("api")
    with running_app(data, engine=engine, model=str(tiny_model), lora_dir=str(lora_dir)) as server:
        yield server


def png(http, **body) -> bytes:
    request = {"positivePrompt": PROMPT, "width": 128, "height": 128, "steps": 2, "seed": 11,
               "outputFormat": "PNG", **body}
    response = http.post(f"/v1/{SLUG}", json=request)
    assert response.status_code == 200, response.text
    return response.content


def test_per_request_lora_over_http(api):
    with api.http() as http:
        plain = png(http)
        styled = png(http, loras=[{"name": "a", "scale": 0.8}, {"name": "b", "scale": 0.5}])
        assert styled != plain
        assert png(http) == plain  # the same worker, right after a LoRA job
        assert png(http, loras=[{"name": "a", "scale": 0}]) == plain
        assert png(http, loras=[{"name": "b", "scale": 0.5}, {"name": "a", "scale": 0.8}]) == styled
        assert Image.open(io.BytesIO(styled)).size == (128, 128)
        submitted = http.post(f"/v2/{SLUG}", json={"positivePrompt": PROMPT, "width": 128, "height": 128,
                                                   "steps": 2, "loras": [{"name": "c.v2"}]}).json()
        assert wait_status(http, submitted["request_id"])["status"] == "COMPLETED"
        metrics = http.get(f"/v2/requests/{submitted['request_id']}").json()["metrics"]
        assert metrics["loras"] == [{"name": "c.v2", "scale": 1.0}]
        assert metrics["lora_load_seconds"] >= 0 and metrics["lora_swap_seconds"] >= 0


def test_an_unknown_lora_is_a_400_listing_the_registered_ones(api):
    with api.http() as http:
        for path in (f"/v1/{SLUG}", f"/v2/{SLUG}"):
            response = http.post(path, json={"positivePrompt": PROMPT, "loras": [{"name": "a"}, {"name": "nope"}]})
            assert response.status_code == 400
            assert response.json() == {"error": "loras: Unknown LoRA 'nope'; registered LoRAs: a, b, c.v2"}
        response = http.post(f"/v2/{SLUG}", json={"positivePrompt": PROMPT, "loras": [{"name": "/etc/passwd"}]})
        assert response.status_code == 400 and "Unknown LoRA '/etc/passwd'" in response.json()["error"]


def test_get_loras_lists_the_registered_adapters(api, lora_dir):
    with api.http() as http:
        body = http.get("/v1/loras").json()
        assert [lora["name"] for lora in body["loras"]] == ["a", "b", "c.v2"]
        assert body["loras"][0] == {"name": "a", "bytes": (lora_dir / "a.safetensors").stat().st_size,
                                    "models": [SLUG]}
        assert body["max_per_request"] == 3 and body["scale"] == {"minimum": -2.0, "maximum": 2.0}
        assert http.get("/v1/loras", params={"model": SLUG}).json() == body
        missing = http.get("/v1/loras", params={"model": "nope"})
        assert missing.status_code == 404 and set(missing.json()) == {"error"}
        operation = http.get("/openapi.json").json()["paths"]["/v1/loras"]["get"]
        assert "401" in operation["responses"] and {"ApiKey": []} in operation["security"]
