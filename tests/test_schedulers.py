"""The 25 scheduler names: each the configuration the table documents, each a working, distinct sampler."""

from __future__ import annotations

import io
import itertools
import re
import threading
from pathlib import Path

import diffusers
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fluxserve.config import Settings
from fluxserve.engine import GenerationParams, load_engine
from fluxserve.engine.schedulers import SCHEDULER_NAMES, SCHEDULERS, build_scheduler, markdown_table
from fluxserve.engine.tiny import FLUX_SCHEDULER_CONFIG

from support.app import SLUG, running_app, shared_engine, wait_status

ALIASES = {frozenset({"Euler", "FlowMatchEulerDiscreteScheduler"})}  # the page names FLUX's Euler twice
STOCHASTIC = [name for name, spec in SCHEDULERS.items() if spec.stochastic]
DETERMINISTIC = [name for name, spec in SCHEDULERS.items() if not spec.stochastic]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(Settings(model=str(tiny_model), max_sequence_length=77))


def pixels(engine, scheduler: str, steps: int, seed: int = 11, prompt: str = "a stone bridge") -> np.ndarray:
    params = GenerationParams(prompt, 64, 64, steps=steps, seed=seed, guidance=3.5, scheduler=scheduler)
    return np.asarray(engine.generate(params), dtype=np.float64) / 255


def test_there_are_25_names_and_the_page_ten_come_first():
    assert len(SCHEDULER_NAMES) == 25
    assert SCHEDULER_NAMES[:10] == ("Euler", "FlowMatchEulerDiscreteScheduler", "DPM++", "DPM++ SDE", "DPM++ 2M",
                                    "DPM++ 2M SDE", "DPM++ 3M", "Euler Beta", "Euler Exponential", "Euler Karras")


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_configuration_is_the_one_the_table_documents(name):
    spec = SCHEDULERS[name]
    generator = torch.Generator()
    scheduler = build_scheduler(name, dict(FLUX_SCHEDULER_CONFIG), generator=generator)
    assert isinstance(scheduler, getattr(diffusers, spec.class_name))
    for key, value in spec.options.items():
        assert scheduler.config[key] == value, key
    if spec.uses_flow_options:  # a diffusion solver run on FLUX's flow schedule, with the model's shift
        assert scheduler.config.use_flow_sigmas is True
        assert scheduler.config.prediction_type == "flow_prediction"
        assert scheduler.config.use_dynamic_shifting is True
        # Their own sigma options would replace the flow sigmas (NaN); spacing is applied on top instead.
        assert not any(scheduler.config.get(f"use_{kind}_sigmas") for kind in ("karras", "exponential", "beta"))
    assert (getattr(scheduler, "generator", None) is generator) == spec.stochastic
    assert spec.configuration() in markdown_table()


def test_the_spacing_variants_keep_the_flow_schedule_end_points():
    for plain, spaced in [("DPM++ 2M", "DPM++ 2M Karras"), ("UniPC", "UniPC Karras"), ("DPM++ 2M", "DPM++ 2M Beta")]:
        schedules = []
        for name in (plain, spaced):
            scheduler = build_scheduler(name, dict(FLUX_SCHEDULER_CONFIG))
            scheduler.set_timesteps(10, mu=0.8)
            schedules.append(scheduler.sigmas)
        a, b = schedules
        assert torch.allclose(a[[0, -2, -1]], b[[0, -2, -1]]) and not torch.allclose(a, b)
        assert float(b.max()) <= 1.0  # flow sigmas, not variance-exploding ones


def test_every_name_gives_a_finite_image_and_distinct_names_differ(engine):
    # 8 steps: enough for every solver's higher orders to come into play (3M's third order needs 6+).
    images = {name: pixels(engine, name, steps=8) for name in SCHEDULER_NAMES}
    for name, image in images.items():
        assert np.isfinite(image).all() and image.std() > 0.05, name
    for a, b in itertools.combinations(SCHEDULER_NAMES, 2):
        same = np.array_equal(images[a], images[b])
        assert same == (frozenset({a, b}) in ALIASES), (a, b)


def test_deterministic_samplers_converge_to_the_same_image(engine):
    """Every ODE solver follows FLUX's flow: with many steps, all land on fine-step Euler's image."""
    # A sampler off FLUX's schedule misses by far more (DEIS without its last step to 0: 0.01; the
    # stochastic samplers land elsewhere by design: 0.2) or gives NaN (DPM++ with its own Karras sigmas).
    reference = pixels(engine, "Euler", steps=64)
    for name in DETERMINISTIC:
        if name == "FlowMatchEulerDiscreteScheduler":
            continue  # Euler itself
        coarse = np.abs(pixels(engine, name, steps=4) - reference).mean()
        fine = np.abs(pixels(engine, name, steps=16) - reference).mean()
        assert fine < 0.004 and fine < coarse, (name, coarse, fine)


def test_stochastic_samplers_use_the_jobs_generator_not_torchs(engine):
    for name in STOCHASTIC:
        torch.manual_seed(0)
        state = torch.get_rng_state()
        first = pixels(engine, name, steps=4)
        assert torch.equal(torch.get_rng_state(), state), f"{name} drew from torch's global RNG"
        torch.manual_seed(12345)  # a different global RNG state changes nothing
        assert np.array_equal(pixels(engine, name, steps=4), first), name
        assert not np.array_equal(pixels(engine, name, steps=4, seed=12), first), name


def test_stochastic_sampler_is_reproducible_under_concurrency(engine):
    expected = {seed: pixels(engine, "DPM++ 2M SDE", steps=6, seed=seed) for seed in (1, 2)}
    results: dict[tuple[int, int], np.ndarray] = {}
    stop = threading.Event()

    def job(seed: int, copy: int) -> None:
        results[seed, copy] = pixels(engine, "DPM++ 2M SDE", steps=6, seed=seed)

    def noisy_neighbour() -> None:  # keeps drawing from torch's global RNG meanwhile
        while not stop.is_set():
            torch.randn(64)

    threads = [threading.Thread(target=job, args=(seed, copy)) for seed in (1, 2) for copy in range(2)]
    neighbour = threading.Thread(target=noisy_neighbour)
    neighbour.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stop.set()
    neighbour.join()
    assert set(results) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for (seed, _copy), image in results.items():
        assert np.array_equal(image, expected[seed])


def test_heun_reports_its_real_model_calls(engine):
    seen = []
    engine.generate(GenerationParams("p", 64, 64, steps=4, seed=1, guidance=3.5, scheduler="Heun"),
                    on_step=lambda step, total: seen.append((step, total)))
    assert seen == [(step, 7) for step in range(1, 8)]  # Heun: 2N-1 model calls


# -- over HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_model):
    """A client on the real app in-process, on the tiny model."""
    with running_app(tmp_path_factory.mktemp("schedulers"), engine=shared_engine(tiny_model),
                     model=str(tiny_model)) as app, app.http() as client:
        yield client


def fetch_image(http: httpx.Client, request_id: str) -> bytes:
    result = http.get(f"/v2/requests/{request_id}").json()
    assert result["status"] == "COMPLETED", result
    return http.get(httpx.URL(result["output"]).path).content


def test_all_25_names_work_over_http(http):
    body = {"positivePrompt": "a lighthouse", "width": 128, "height": 128, "steps": 6, "outputFormat": "PNG"}
    ids = {name: http.post(f"/v2/{SLUG}", json={**body, "scheduler": name}).json()["request_id"]
           for name in SCHEDULER_NAMES}
    for name, request_id in ids.items():
        assert wait_status(http, request_id)["status"] == "COMPLETED", name
        image = np.asarray(Image.open(io.BytesIO(fetch_image(http, request_id))), dtype=np.float64)
        assert image.shape == (128, 128, 3) and image.std() > 5, name
        assert http.get(f"/v2/requests/{request_id}").json()["metrics"]["scheduler"] == name


def test_same_stochastic_request_same_bytes_when_submitted_together(http):
    body = {"positivePrompt": "a fox in snow", "width": 128, "height": 128, "steps": 6, "seed": 99,
            "outputFormat": "PNG", "scheduler": "DPM++ 2M SDE"}
    ids = [http.post(f"/v2/{SLUG}", json=body).json()["request_id"] for _ in range(2)]
    for request_id in ids:
        assert wait_status(http, request_id)["status"] == "COMPLETED"
    first, second = (fetch_image(http, request_id) for request_id in ids)
    assert first == second


def test_unknown_scheduler_is_400_listing_every_valid_name(http):
    response = http.post(f"/v2/{SLUG}", json={"positivePrompt": "a", "scheduler": "Euler A"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "Euler A" in error
    listed = error.split("is not one of: ", 1)[1].split(", ")
    assert listed == list(SCHEDULER_NAMES)


def test_docs_list_the_names_from_the_table(http):
    spec = http.get("/openapi.json").json()
    schema = spec["paths"][f"/v2/{SLUG}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    field = schema["properties"]["scheduler"]
    assert field["enum"] == list(SCHEDULER_NAMES)
    for name in SCHEDULER_NAMES:
        assert f"`{name}`" in field["description"]


def test_readme_has_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme
    rows = re.findall(r"^\| `([^`]+)` \| `[A-Za-z]+\(", readme, flags=re.M)
    assert rows == list(SCHEDULER_NAMES)
