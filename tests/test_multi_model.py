"""Several models from one server or fleet: the model table (flags, FLUXSERVE_MODELS, a models file),
`/v1/{slug}` and `/v2/{slug}` per model, `GET /v1/models`, workers that serve some models only, and the
workers' adverts in the shared store (a model no live worker serves is a 503 at submit)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fluxserve.catalog import ModelConfigError, model_table, split_model_flags
from fluxserve.config import Settings
from fluxserve.contract import GenerateRequest
from fluxserve.engine.tiny import save_tiny_model
from fluxserve.jobs import Job, new_job_id
from fluxserve.presence import FleetView, ModelState, RedisPresence, SqlitePresence

from support.accounts import create_key
from support.app import SLUG, running_app, shared_engine, wait_for, wait_status
from support.processes import FluxserveProcess

SMALL = {"width": 128, "height": 128, "steps": 2, "seed": 11, "outputFormat": "PNG"}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models with different weights."""
    root = tmp_path_factory.mktemp("two-models")
    return save_tiny_model(root / "a", seed=1), save_tiny_model(root / "b", seed=2)


def by_location(settings: Settings):
    """Each model's engine, loaded once per session per location."""
    return shared_engine(Path(settings.model.model))


def models_env(two_models) -> str:
    return f"a={two_models[0]},b={two_models[1]}"


# -- the model table -----------------------------------------------------------------------------


def test_model_flags_env_and_file(tmp_path, monkeypatch):
    assert split_model_flags(["/m/x", "a=/m/a", "b=org/repo"]) == ("/m/x", "a=/m/a,b=org/repo")
    assert split_model_flags([]) == (None, None)
    with pytest.raises(ModelConfigError, match="both want the default slug"):
        split_model_flags(["/m/x", "/m/y"])

    for name in ("FLUXSERVE_MODEL", "FLUXSERVE_MODELS", "FLUXSERVE_MODELS_FILE", "FLUXSERVE_WORKER_MODELS"):
        monkeypatch.delenv(name, raising=False)
    assert list(model_table(Settings())) == [SLUG]  # nothing configured: the demo model, as before
    monkeypatch.setenv("FLUXSERVE_MODELS", "a=/m/a, b=/m/b")
    table = model_table(Settings())
    assert list(table) == ["a", "b"] and table["b"].model.model == "/m/b" and table["b"].model.slug == "b"
    monkeypatch.setenv("FLUXSERVE_MODEL", "/m/x")  # a bare location: the default slug, beside the others
    assert list(model_table(Settings())) == [SLUG, "a", "b"]
    assert Settings().worker_slugs == [SLUG, "a", "b"]

    models_file = tmp_path / "models.toml"
    models_file.write_text(
        '[models.a]\nmodel = "/m/a-file"\nbase_model = "/m/base"\nloras = "/l/x.safetensors:0.5"\n'
        'speed_preset = "turbo"\nmoderation = false\nprice_per_image = 2.5\n\n'
        '[models.c]\nmodel = "/m/c"\nmemory_mode = "model_cpu_offload"\n'
    )
    monkeypatch.setenv("FLUXSERVE_MODELS_FILE", str(models_file))
    table = model_table(Settings())
    assert list(table) == [SLUG, "a", "c", "b"]
    a, c = table["a"], table["c"]
    # FLUXSERVE_MODELS overrides the file's location; the file's other options stay.
    assert a.model.model == "/m/a" and a.model.base_model == "/m/base" and a.model.loras == "/l/x.safetensors:0.5"
    assert a.speed.preset == "turbo" and a.moderation.enabled is False and a.accounts.price_per_image == 2.5
    assert c.model.memory_mode == "model_cpu_offload" and c.moderation.enabled and c.accounts.price_per_image == 1
    monkeypatch.setenv("FLUXSERVE_WORKER_MODELS", "c,a")
    assert Settings().worker_slugs == ["c", "a"]
    monkeypatch.setenv("FLUXSERVE_WORKER_MODELS", "a,nope")
    with pytest.raises(ModelConfigError, match="'nope', not configured here"):
        _ = Settings().worker_slugs


@pytest.mark.parametrize(("text", "complaint"), [
    ('[models.a]\nmodel = "/m/a"\nwidth = 3\n', "unknown option.* width"),
    ('[models.models]\nmodel = "/m/a"\n', "is a path of the API"),
    ('[models.a]\nbase_model = "/m/base"\n', "'a': no location"),
    ('[models.a]\nmodel = "/m/a"\nspeed_preset = "warp"\n', "model 'a'"),
    ('[model.a]\nmodel = "/m/a"\n', r"unknown table\(s\) model"),
    ("[models.a\n", "not valid TOML"),
])
def test_a_wrong_models_file_is_one_clear_error(tmp_path, text, complaint):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelConfigError, match=complaint):
        model_table(Settings(models_file=path))


def test_the_cli_refuses_a_wrong_models_file_in_one_line(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "models.toml"
    path.write_text('[models.a]\nmodel = "/m/a"\nwidth = 3\n')
    done = subprocess.run([sys.executable, "-m", "fluxserve", "worker", "--models-file", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "FLUXSERVE_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 2, done.stderr
    assert "unknown option(s) width" in done.stderr and "Traceback" not in done.stderr


# -- one server, two models -----------------------------------------------------------------------


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_two_models_on_one_server(tmp_path, two_models):
    with running_app(tmp_path, engine_loader=by_location, models=models_env(two_models)) as srv, \
            srv.http() as http:
        first = http.post("/v1/a", json={"positivePrompt": "a red barn", **SMALL})
        second = http.post("/v1/b", json={"positivePrompt": "a red barn", **SMALL})
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert png(first.content).size == png(second.content).size == (128, 128)
        assert first.content != second.content  # the same request, another model, another image
        again = http.post("/v1/a", json={"positivePrompt": "a red barn", **SMALL})
        assert again.content == first.content

        queued = http.post("/v2/b", json={"positivePrompt": "a red barn", **SMALL}).json()
        assert wait_status(http, queued["request_id"])["status"] == "COMPLETED"
        media = http.get(httpx.URL(http.get(f"/v2/requests/{queued['request_id']}").json()["output"]).path)
        assert media.content == second.content

        # Only the configured models are routed: the default slug is not one of them here.
        for path in ("/v1/nope", "/v2/nope", f"/v1/{SLUG}", f"/v2/{SLUG}"):
            response = http.post(path, json={"positivePrompt": "a red barn"})
            assert response.status_code == 404 and response.json()["error"].startswith("Model not found"), path

        listing = http.get("/v1/models").json()
        assert listing["object"] == "list" and [model["id"] for model in listing["data"]] == ["a", "b"]
        for model in listing["data"]:
            assert model["object"] == "model" and model["owned_by"] == "fluxserve"
            assert isinstance(model["created"], int) and model["state"] == "ready"
            assert model["endpoints"] == {"sync": f"/v1/{model['id']}", "async": f"/v2/{model['id']}",
                                          "openai": "/v1/images/generations"}
            parameters = model["parameters"]["properties"]
            assert set(GenerateRequest.model_fields) <= set(parameters) and "webhook" in parameters
            assert parameters["width"]["minimum"] == 128 and parameters["width"]["maximum"] == 2048
        assert http.get("/v1/models/b").json()["id"] == "b"
        assert http.get("/v1/models/nope").status_code == 404
        health = http.get("/health").json()
        assert health["models"] == {"a": "ready", "b": "ready"} and health["engine"] == "ready"
        assert health["demo"] is False


def test_each_model_has_its_price_and_keys_keep_their_allow_lists(tmp_path, two_models):
    models_file = tmp_path / "models.toml"
    models_file.write_text(f'[models.a]\nmodel = "{two_models[0]}"\n\n'
                           f'[models.b]\nmodel = "{two_models[1]}"\nprice_per_image = 3\n')
    data_dir = tmp_path / "data"
    everything = create_key(data_dir, "everything", credits=100)
    only_a = create_key(data_dir, "only-a", credits=100, models=("a",))
    with running_app(data_dir, engine_loader=by_location, models_file=models_file) as srv:
        with srv.http(everything.key) as http:
            costs = {}
            for slug in ("a", "b"):
                job = http.post(f"/v2/{slug}", json={"positivePrompt": "a price", **SMALL}).json()["request_id"]
                wait_status(http, job)
                costs[slug] = http.get(f"/v2/requests/{job}").json()["metrics"]["cost"]
            assert costs == {"a": 1, "b": 3}
            assert http.get("/v1/account").json()["balance"] == 96
            prices = {model["id"]: model["pricing"]["per_image"] for model in http.get("/v1/models").json()["data"]}
            assert prices == {"a": 1, "b": 3}
        with srv.http(only_a.key) as http:
            refused = http.post("/v2/b", json={"positivePrompt": "not mine", **SMALL})
            assert refused.status_code == 403 and "not allowed to use the model b" in refused.json()["error"]
            assert http.post("/v2/a", json={"positivePrompt": "mine", **SMALL}).status_code == 200


def test_a_worker_serving_a_never_runs_b_and_b_is_a_503(tmp_path, two_models):
    """The embedded worker loads model a only: b's submits are refused at once (no worker serves it), and
    a job for b put in the queue anyway stays there while a's jobs, submitted after it, run."""
    with running_app(tmp_path, engine_loader=by_location, models=models_env(two_models),
                     worker_models="a") as srv, srv.http() as http:
        states = {model["id"]: model["state"] for model in http.get("/v1/models").json()["data"]}
        assert states == {"a": "ready", "b": "no worker"}
        refused = http.post("/v2/b", json={"positivePrompt": "nobody runs me", **SMALL})
        assert refused.status_code == 503
        assert refused.json()["error"].startswith("No running worker serves the model b")
        assert http.post("/v1/b", json={"positivePrompt": "nobody runs me", **SMALL}).status_code == 503

        stray = srv.services.jobs.submit(Job(id=new_job_id(), slug="b", created_at=time.time(),
                                             params=GenerateRequest(positivePrompt="stray", **SMALL)))
        ran = [http.post("/v2/a", json={"positivePrompt": f"a {i}", **SMALL}).json()["request_id"] for i in range(2)]
        assert [wait_status(http, job)["status"] for job in ran] == ["COMPLETED", "COMPLETED"]
        assert srv.services.jobs.get(stray.id).state.value == "QUEUED"
        assert http.get("/health").json()["models"] == {"a": "ready", "b": "external"}


def test_a_model_that_failed_to_load_is_a_502_and_the_others_serve(tmp_path, two_models):
    missing = tmp_path / "no-such-model"
    with running_app(tmp_path / "data", models=f"a={two_models[0]},broken={missing}", wait_ready=False) as srv, \
            srv.http() as http:
        wait_for(lambda: http.get("/health").json()["models"] == {"a": "ready", "broken": "failed"},
                 what="both models loaded or failed")
        health = http.get("/health").json()
        assert health["engine"] == "failed" and health["engine_error"].startswith("broken: ")
        refused = http.post("/v2/broken", json={"positivePrompt": "a cat", **SMALL})
        assert refused.status_code == 502 and refused.json()["error"].startswith("The model is not available: ")
        states = {model["id"]: model["state"] for model in http.get("/v1/models").json()["data"]}
        assert states == {"a": "ready", "broken": "failed"}
        assert http.post("/v1/a", json={"positivePrompt": "a cat", **SMALL}).status_code == 200


# -- a fleet: an API replica and a worker process --------------------------------------------------


@pytest.mark.drill
def test_a_worker_process_with_models_a_serves_a_only(tmp_path, two_models):
    """`fluxserve worker --models a` beside an API replica (no embedded worker) on one SQLite store: the
    replica learns from the worker's adverts which models are served."""
    data_dir = tmp_path / "data"
    env = {"FLUXSERVE_DATA_DIR": str(data_dir), "FLUXSERVE_WORKER_PRESENCE_SECONDS": "3",
           "FLUXSERVE_LOG_FORMAT": "text"}
    flags = ["--model", f"a={two_models[0]}", "--model", f"b={two_models[1]}"]  # as FLUXSERVE_MODELS says
    with running_app(data_dir, models=models_env(two_models), worker=False, wait_ready=False) as srv, \
            srv.http() as http:
        # No worker at all yet (a fleet starting): jobs queue, as they always did.
        early = http.post("/v2/a", json={"positivePrompt": "before any worker", **SMALL})
        assert early.status_code == 200, early.text
        assert {model["state"] for model in http.get("/v1/models").json()["data"]} == {"queued"}

        worker = FluxserveProcess(["worker", "--models", "a", *flags], tmp_path / "worker.log", env).start()
        try:
            worker.wait_ready(timeout=120)
            wait_for(lambda: {m["id"]: m["state"] for m in http.get("/v1/models").json()["data"]}
                     == {"a": "ready", "b": "no worker"}, timeout=30, what="the worker's adverts")
            assert wait_status(http, early.json()["request_id"])["status"] == "COMPLETED"
            refused = http.post("/v2/b", json={"positivePrompt": "nobody runs me", **SMALL})
            assert refused.status_code == 503 and "No running worker serves the model b" in refused.json()["error"]
            stray = srv.services.jobs.submit(Job(id=new_job_id(), slug="b", created_at=time.time(),
                                                 params=GenerateRequest(positivePrompt="stray", **SMALL)))
            later = http.post("/v2/a", json={"positivePrompt": "after the stray one", **SMALL}).json()["request_id"]
            assert wait_status(http, later)["status"] == "COMPLETED"
            assert srv.services.jobs.get(stray.id).state.value == "QUEUED"
            assert stray.id not in worker.log()
        finally:
            worker.terminate(timeout=60)
        # A worker that stops withdraws its adverts: no worker at all is up, so jobs queue again.
        wait_for(lambda: {m["state"] for m in http.get("/v1/models").json()["data"]} == {"queued"}, timeout=10,
                 what="the adverts withdrawn")
        assert http.post("/v2/b", json={"positivePrompt": "waits", **SMALL}).status_code == 200


# -- the adverts, on each store ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def presence(request, tmp_path):
    """Two handles on one backend's adverts (two processes)."""
    if request.param == "sqlite":
        handles = [SqlitePresence(tmp_path / "jobs.sqlite3") for _ in range(2)]
    elif request.param == "redis":
        import uuid

        url, prefix = request.getfixturevalue("redis_url"), f"test-presence-{uuid.uuid4().hex[:8]}"
        handles = [RedisPresence.from_url(url, prefix=prefix) for _ in range(2)]
    else:
        from fluxserve.presence import PostgresPresence

        url = request.getfixturevalue("postgres_url")
        handles = [PostgresPresence.from_url(url) for _ in range(2)]
    yield handles
    for handle in handles:
        handle.withdraw("w1")
        handle.withdraw("w2")
        handle.close()


def test_adverts_are_shared_lapse_and_are_withdrawn(presence):
    worker, api = presence
    assert api.live() == []
    worker.advertise("w1", {"a": ModelState("loading"), "b": ModelState("failed", "no weights")}, ttl=30)
    worker.advertise("w2", {"a": ModelState("ready")}, ttl=2.0)  # wide enough for a busy machine's pause
    w2_lapses = time.monotonic() + 2.0  # at the latest
    view = FleetView(tuple(api.live()))
    assert view.workers == {"w1", "w2"} and view.states("a") == ["loading", "ready"]
    assert view.serving("a") and not view.serving("b") and view.errors("b") == ["no weights"]
    worker.advertise("w1", {"a": ModelState("ready")}, ttl=30)  # replaces w1's adverts
    assert not FleetView(tuple(api.live())).errors("b")
    time.sleep(max(0.0, w2_lapses - time.monotonic()) + 0.1)  # w2 was not renewed: it lapsed
    assert FleetView(tuple(api.live())).workers == {"w1"}
    worker.withdraw("w1")
    assert api.live() == []


class FakePresence:
    def __init__(self, adverts=(), error: Exception | None = None) -> None:
        self.adverts, self.error, self.reads = list(adverts), error, 0

    def live(self):
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.adverts


def test_who_serves_a_model_decides_the_submit():
    from fluxserve.app.errors import ModelUnavailable, Unavailable
    from fluxserve.app.models import ModelDirectory
    from fluxserve.presence import Advert, PresenceView
    from fluxserve.services import EngineSlot

    table = model_table(Settings(models="a=/m/a,b=/m/b"))

    def directory(adverts=(), local=None, error=None, own_worker=None):
        presence = FakePresence(adverts, error)
        return ModelDirectory(table, local or {}, PresenceView(presence), default="a", created=0,
                              own_worker=own_worker), presence

    assert directory()[0].unavailable("a") is None  # no worker at all is up: the job waits for one
    loading = directory([Advert("w1", "a", "loading")])[0]
    assert loading.unavailable("a") is None  # still loading counts as served
    assert isinstance(loading.unavailable("b"), Unavailable)  # a worker is up, none serves b
    failed = directory([Advert("w1", "a", "failed", "no weights"), Advert("w1", "b", "ready")])[0]
    problem = failed.unavailable("a")
    assert isinstance(problem, ModelUnavailable) and problem.message == "The model is not available: no weights"
    both = directory([Advert("w1", "a", "failed", "no weights"), Advert("w2", "a", "ready")])[0]
    assert both.unavailable("a") is None  # another worker has it
    embedded = directory(local={"a": EngineSlot(state="failed", error="bad LoRA")})[0]
    assert embedded.unavailable("a").message == "The model is not available: bad LoRA"
    assert isinstance(embedded.unavailable("b"), Unavailable)  # this process runs a worker, without b
    assert directory(local={"a": EngineSlot(state="loading")})[0].unavailable("a") is None
    # This process's own advert, read just before its model failed, still says loading: its slot decides.
    stale = directory([Advert("me", "a", "loading")], local={"a": EngineSlot(state="failed", error="the GPU is gone")},
                      own_worker="me")[0]
    assert stale.unavailable("a").message == "The model is not available: the GPU is gone"
    assert [model["state"] for model in stale.listing()] == ["failed", "no worker"]

    down, presence = directory(error=ConnectionError("store down"))
    assert down.unavailable("a") is None and down.unavailable("b") is None  # the submit meets the store next
    assert presence.reads == 1  # a failed read is not retried on every submit
    assert [model["state"] for model in down.listing()] == ["unknown", "unknown"]


def test_an_on_demand_model_queues_while_its_workers_are_scaled_to_zero(tmp_path):
    """A model whose workers an autoscaler starts on its queue (`on_demand`): its submit queues while
    another model's worker is up and none serves it, where an ordinary model is a 503."""
    from fluxserve.app.errors import Unavailable
    from fluxserve.app.models import ModelDirectory
    from fluxserve.presence import Advert, PresenceView

    models_file = tmp_path / "models.toml"
    models_file.write_text('[models.a]\nmodel = "/m/a"\n\n[models.b]\nmodel = "/m/b"\non_demand = true\n\n'
                           '[models.c]\nmodel = "/m/c"\n')
    table = model_table(Settings(models_file=models_file))
    assert table["b"].model.on_demand and not table["c"].model.on_demand
    only_a = ModelDirectory(table, {}, PresenceView(FakePresence([Advert("w1", "a", "ready")])), default="a",
                            created=0)
    assert only_a.unavailable("b") is None  # queued: the autoscaler wakes b's workers on it
    assert isinstance(only_a.unavailable("c"), Unavailable)
