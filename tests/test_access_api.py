"""The access layer over HTTP, against the real app (in-process) with keys: every error code of the contract as
`{"error": ...}` (and the real segmind SDK raising SegmindError with the message), credits under a
burst of concurrent submits, job visibility, and keys never in clear in the database or the log."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest
from segmind.exceptions import SegmindError
from segmind.v2 import AsyncJob, InferenceFailed
from typer.testing import CliRunner

from fluxserve.app.access import KEYS_RECHECK_SECONDS
from fluxserve.cli import app as fluxserve_cli

from support.accounts import accounts_of, create_key, revoke_key
from support.app import SLUG, running_app, shared_engine, wait_status
from support.faults import FaultyEngine, fail_submits_on, failing_loader
from support.processes import free_port

TINY = {"positivePrompt": "a cat", "width": 128, "height": 128, "steps": 1}
SYNC_TIMEOUT_S = 2
SLOW_JOB_S = 4
ISSUED: list[str] = []  # every key made in this module, for the "never in clear" check


def make_key(data_dir: Path, name: str, **limits) -> str:
    """An account with one key, made with the same code as `fluxserve keys create`."""
    key = create_key(data_dir, name, **limits).key
    ISSUED.append(key)
    return key


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("access")


@pytest.fixture(scope="module")
def keys(data_dir) -> dict[str, str]:
    keys = {
        "alice": make_key(data_dir, "alice"),
        "bob": make_key(data_dir, "bob"),
        "poor": make_key(data_dir, "poor", credits=0.5),
        "other-model": make_key(data_dir, "other-model", models=("some-other-model",)),
        "slow-lane": make_key(data_dir, "slow-lane", rate=2),
        "one-at-a-time": make_key(data_dir, "one-at-a-time", in_flight=1),
        "revoked": make_key(data_dir, "revoked"),
        "burst": make_key(data_dir, "burst", credits=50),
        "retrier": make_key(data_dir, "retrier", credits=10),
    }
    revoke_key(data_dir, keys["revoked"])
    return keys


@pytest.fixture(scope="module")
def srv(data_dir, keys, tiny_model):
    """Keys exist, so the default `auto` mode requires them. Faults armed by marker words in prompts:
    the engine fails on `__explode__` and stalls on `__slow__`; storing a job fails on `__api500__`.
    Two workers, so a stalled job does not hold up the next test's jobs."""
    engine = FaultyEngine(shared_engine(tiny_model), error_on="__explode__", delay_on="__slow__",
                          delay_seconds=SLOW_JOB_S)
    with running_app(data_dir, engine=engine, model=str(tiny_model), sync_timeout_seconds=SYNC_TIMEOUT_S,
                     worker_concurrency=2, setup=lambda services: fail_submits_on(services, "__api500__")) as app:
        yield app


def client_for(srv, key: str | None) -> httpx.Client:
    return srv.http(key)


def sdk(srv, key: str | None):
    return srv.sdk(key)


def account_of(srv, key: str) -> dict:
    response = client_for(srv, key).get("/v1/account")
    assert response.status_code == 200, response.text
    return response.json()


def wait_settled(srv, key: str, timeout: float = 60) -> dict:
    """The worker settles right after a job ends; a status read can be a moment ahead of it."""
    deadline = time.monotonic() + timeout
    while (account := account_of(srv, key))["reserved"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return account


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    for word in words:
        assert word in body["error"]
    return body["error"]


def assert_sdk_error(call, status: int, *words: str) -> SegmindError:
    with pytest.raises(SegmindError) as excinfo:
        call()
    assert excinfo.value.status == status
    for word in words:
        assert word in excinfo.value.detail
    return excinfo.value


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)


def test_a_valid_key_works_on_v1_v2_and_account(srv, keys):
    before = account_of(srv, keys["alice"])
    assert before["name"] == "alice" and before["balance"] == 10 and before["models"] is None
    image = sdk(srv, keys["alice"]).run_sync(SLUG, **TINY, outputFormat="PNG")
    assert image.headers["content-type"] == "image/png"
    assert account_of(srv, keys["alice"])["balance"] == 9  # v1 answers after the charge
    # Authorization: Bearer works as well as x-api-key.
    bearer = srv.http(headers={"Authorization": f"Bearer {keys['alice']}"})
    request_id = bearer.post(f"/v2/{SLUG}", json=TINY).json()["request_id"]
    assert wait_status(bearer, request_id)["status"] == "COMPLETED"
    result = bearer.get(f"/v2/requests/{request_id}").json()
    assert result["metrics"]["cost"] == 1
    assert wait_settled(srv, keys["alice"])["balance"] == 8


@pytest.mark.parametrize("who", ["none", "unknown", "malformed", "revoked"])
def test_401_for_a_missing_unknown_or_revoked_key(srv, keys, who):
    key = {"none": None, "unknown": "fsk_000000000000_" + "x" * 43, "malformed": "sk-123",
           "revoked": keys["revoked"]}[who]
    word = {"none": "Missing API key", "revoked": "revoked"}.get(who, "Invalid API key")
    http = client_for(srv, key)
    for method, path in [("POST", f"/v1/{SLUG}"), ("POST", f"/v2/{SLUG}"), ("GET", "/v1/account"),
                         ("GET", "/v2/requests/00000000-0000-4000-8000-000000000000/status")]:
        assert_error(http.request(method, path, json=TINY if method == "POST" else None), 401, word)
    assert_sdk_error(lambda: sdk(srv, key).run_sync(SLUG, **TINY), 401, word)
    assert_sdk_error(lambda: sdk(srv, key).submit_async(SLUG, **TINY), 401, word)


def test_403_for_a_model_the_key_may_not_use(srv, keys):
    http = client_for(srv, keys["other-model"])
    assert_error(http.post(f"/v2/{SLUG}", json=TINY), 403, SLUG)
    assert_sdk_error(lambda: sdk(srv, keys["other-model"]).run_sync(SLUG, **TINY), 403, "not allowed")


def test_403_for_another_accounts_job_status_result_and_media(srv, keys):
    job = sdk(srv, keys["alice"]).submit_async(SLUG, **TINY)
    result = job.wait(timeout=120, interval=0.2)
    output = httpx.URL(result["output"])
    assert "sig=" in str(output.query)  # a signed link: it works without the key ...
    assert client_for(srv, None).get(str(output)).status_code == 200
    bob = client_for(srv, keys["bob"])
    for path in (f"/v2/requests/{job.request_id}/status", f"/v2/requests/{job.request_id}", output.path):
        assert_error(bob.get(path), 403, "another account")
        assert_error(client_for(srv, None).get(path), 401)  # ... the bare path does not
        assert client_for(srv, keys["alice"]).get(path).status_code == 200
    assert_error(client_for(srv, None).get(f"{output.path}?sig={'0' * 64}"), 401)
    # The SDK, holding bob's key and alice's job.
    stolen = AsyncJob(job.request_id, job.status_url, job.response_url, {}, _client=sdk(srv, keys["bob"]))
    assert_sdk_error(stolen.status, 403, "another account")
    assert_sdk_error(stolen.result, 403, "another account")


def test_406_when_the_credits_cannot_cover_the_job(srv, keys):
    assert_error(client_for(srv, keys["poor"]).post(f"/v2/{SLUG}", json=TINY), 406, "Not enough credits", "0.5")
    assert_sdk_error(lambda: sdk(srv, keys["poor"]).run_sync(SLUG, **TINY), 406, "Not enough credits")
    assert_sdk_error(lambda: sdk(srv, keys["poor"]).submit_async(SLUG, **TINY), 406, "Not enough credits")
    assert account_of(srv, keys["poor"])["balance"] == 0.5


def test_429_over_the_rate_limit_with_retry_after(srv, keys):
    http = client_for(srv, keys["slow-lane"])  # 2 per minute
    assert [http.post(f"/v2/{SLUG}", json=TINY).status_code for _ in range(2)] == [200, 200]
    response = http.post(f"/v2/{SLUG}", json=TINY)
    assert_error(response, 429, "Rate limit", "2 generation requests per minute")
    assert 0 < int(response.headers["Retry-After"]) <= 30
    assert_sdk_error(lambda: sdk(srv, keys["slow-lane"]).run_sync(SLUG, **TINY), 429, "Rate limit")
    assert account_of(srv, keys["slow-lane"])["limits"]["requests_per_minute"] == 2


def test_504_then_the_job_finishes_and_429_while_it_is_in_flight(srv, keys):
    key = keys["one-at-a-time"]  # one job in flight
    http = client_for(srv, key)
    message = assert_error(http.post(f"/v1/{SLUG}", json={**TINY, "positivePrompt": "__slow__ v1"}), 504,
                           "still running", "/v2/requests/")
    status_url = message.split("poll ")[1]
    assert http.get(status_url).json()["status"] in ("QUEUED", "PROCESSING")
    # The unfinished job still counts against the key's one job in flight.
    response = http.post(f"/v2/{SLUG}", json=TINY)
    assert_error(response, 429, "in flight")
    assert int(response.headers["Retry-After"]) >= 1
    assert_sdk_error(lambda: sdk(srv, key).submit_async(SLUG, **TINY), 429, "in flight")
    # The SDK meets the same timeout as SegmindError 504, once the key is free again.
    request_id = status_url.split("/")[-2]
    assert wait_status(http, request_id, timeout=120)["status"] == "COMPLETED"
    assert wait_settled(srv, key)["balance"] == 9  # the job that outlived its v1 call is charged
    assert_sdk_error(lambda: sdk(srv, key).run_sync(SLUG, **{**TINY, "positivePrompt": "__slow__ sdk"}), 504,
                     "still running")


def test_500_is_generic_logged_with_a_reference_and_refunds(srv, keys):
    key = keys["bob"]
    before = account_of(srv, key)
    message = assert_error(client_for(srv, key).post(f"/v2/{SLUG}", json={**TINY, "positivePrompt": "__api500__"}),
                           500, "Internal server error (ref ")
    ref = message.split("ref ")[1].rstrip(")")
    assert "injected API fault" not in message and "Traceback" not in message
    assert f"ref={ref}" in srv.log()
    assert_sdk_error(lambda: sdk(srv, key).run_sync(SLUG, **{**TINY, "positivePrompt": "__api500__"}), 500,
                     "Internal server error")
    after = account_of(srv, key)
    assert (after["balance"], after["reserved"]) == (before["balance"], before["reserved"])


def test_failed_jobs_release_their_credits(srv, keys):
    key = keys["bob"]
    before = account_of(srv, key)["balance"]
    job = sdk(srv, key).submit_async(SLUG, **{**TINY, "positivePrompt": "__explode__ v2"})
    with pytest.raises(InferenceFailed):
        job.wait(timeout=120, interval=0.2)
    response = client_for(srv, key).post(f"/v1/{SLUG}", json={**TINY, "positivePrompt": "__explode__ v1"})
    assert response.status_code == 422
    after = wait_settled(srv, key)
    assert after["balance"] == before and after["reserved"] == 0
    with accounts_of(srv.data_dir) as store:
        kinds = [e.kind for e in store.ledger() if e.job_id == job.request_id]
    assert kinds == ["reserve", "release"]


def test_200_concurrent_submits_with_credits_for_50(srv, keys):
    key = keys["burst"]

    async def burst(http: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(*(http.post(f"/v2/{SLUG}", json={**TINY, "seed": i}) for i in range(200)))

    responses = srv.gather(burst, headers={"x-api-key": key})
    accepted = [r.json()["request_id"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) == 50
    assert all(r.status_code == 406 and "Not enough credits" in r.json()["error"] for r in refused)
    http = client_for(srv, key)
    for request_id in accepted:
        assert wait_status(http, request_id, timeout=300)["status"] == "COMPLETED"
    account = wait_settled(srv, key)
    assert (account["balance"], account["reserved"], account["available"]) == (0, 0, 0)
    with accounts_of(srv.data_dir) as store:
        account_id = store.find_account("burst").id
        ledger = store.ledger(account_id)
    assert sorted(e.kind for e in ledger) == ["charge"] * 50 + ["credit"] + ["reserve"] * 50
    assert {e.job_id for e in ledger if e.kind == "charge"} == set(accepted)  # each job charged once
    assert sum(e.amount for e in ledger) == 0 and sum(e.reserved_change for e in ledger) == 0
    balance = 0
    for entry in ledger:
        balance += entry.amount
        assert entry.balance_after == balance and entry.balance_after >= 0


def test_idempotent_concurrent_submits_make_one_job_and_one_charge(srv, keys):
    key = keys["retrier"]
    before = account_of(srv, key)["balance"]

    async def retries(http: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(*(
            http.post(f"/v2/{SLUG}", json={**TINY, "seed": 99}, headers={"Idempotency-Key": "order-17"})
            for _ in range(6)
        ))

    responses = srv.gather(retries, headers={"x-api-key": key})
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 1
    (request_id,) = ids
    assert wait_status(client_for(srv, key), request_id)["status"] == "COMPLETED"
    after = wait_settled(srv, key)
    assert after["balance"] == before - 1 and after["reserved"] == 0
    with accounts_of(srv.data_dir) as store:
        account_id = store.find_account("retrier").id
        charges = [e for e in store.ledger(account_id) if e.kind == "charge"]
    assert [e.job_id for e in charges] == [request_id]


def test_cancelled_jobs_are_not_charged(srv, keys):
    key = keys["retrier"]
    http = client_for(srv, key)
    before = wait_settled(srv, key)["balance"]
    request_id = http.post(f"/v2/{SLUG}", json={**TINY, "positivePrompt": "__slow__ cancel me"}).json()["request_id"]
    cancelled = http.post(f"/v2/requests/{request_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "FAILED"
    after = wait_settled(srv, key)
    assert after["balance"] == before and after["reserved"] == 0


def test_keys_are_never_in_clear_in_the_database_or_the_log(srv, data_dir):
    """Last in this module: every key above has been used against the app by now. The log is
    everything the process logged while the app ran (messages, extra fields and tracebacks)."""
    assert len(ISSUED) >= 8
    log = srv.log()
    files = list(data_dir.glob("jobs.sqlite3*"))
    assert log and files
    listing = keys_cli("list", "--data-dir", str(data_dir))
    assert listing.exit_code == 0 and "alice" in listing.stdout
    for key in ISSUED:
        secret = key.split("_", 2)[2]
        assert secret not in listing.stdout
        assert key not in log and secret not in log
        for path in files:
            raw = path.read_bytes()
            assert key.encode() not in raw and secret.encode() not in raw, path


# -- apps and CLI runs of their own ------------------------------------------------------------


@pytest.fixture()
def no_fluxserve_env(monkeypatch):
    """The CLI sees no FLUXSERVE_* settings but those a test gives it."""
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)


def keys_cli(*args: str):
    """`fluxserve keys ...`, run through the CLI's own entry point (in this process)."""
    return fluxserve_cli_run("keys", *args)


def fluxserve_cli_run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(fluxserve_cli, list(args), env=env, catch_exceptions=False)


def test_502_when_the_engine_is_unavailable_and_keys_turn_on_live(tmp_path, tiny_model):
    with running_app(tmp_path / "data", engine_loader=failing_loader("the GPU is gone"), model=str(tiny_model),
                     wait_ready=False) as srv:
        deadline = time.monotonic() + 120
        while srv.engine_state() != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        anonymous = client_for(srv, None)
        # A fresh loopback server with no keys is open.
        assert_error(anonymous.post(f"/v2/{SLUG}", json=TINY), 502, "the GPU is gone")
        assert_sdk_error(lambda: sdk(srv, None).run_sync(SLUG, **TINY), 502, "not available")
        assert_error(anonymous.get("/v1/account"), 404, "not metered")
        # The first key created (while it runs) turns keys on, within the server's one-second recheck.
        key = make_key(srv.data_dir, "first")
        time.sleep(KEYS_RECHECK_SECONDS)
        assert_error(anonymous.post(f"/v2/{SLUG}", json=TINY), 401, "Missing API key")
        assert_sdk_error(lambda: sdk(srv, key).run_sync(SLUG, **TINY), 502, "the GPU is gone")
        assert account_of(srv, key)["balance"] == 10  # nothing was reserved


@pytest.mark.parametrize("auth", [None, "required"])
def test_refuses_to_start_on_all_interfaces_without_a_key(tmp_path, auth, no_fluxserve_env):
    port = free_port()
    args = ["serve", "--host", "0.0.0.0", "--port", str(port), "--data-dir", str(tmp_path)]
    run = fluxserve_cli_run(*args, *(["--auth", auth] if auth else []), env={"FLUXSERVE_MODEL": "x"})
    assert run.exit_code == 2
    assert "Refusing to start" in run.stderr and "keys create" in run.stderr and "--auth off" in run.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_keys_cli_create_list_top_up_revoke(tmp_path, no_fluxserve_env):
    def keys(*args: str):
        return keys_cli(*args, "--data-dir", str(tmp_path))

    created = keys("create", "--name", "team", "--credits", "12.5", "--rate", "5/min", "--concurrency", "2",
                   "--models", f"{SLUG},other")
    assert created.exit_code == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    ISSUED.append(key)
    assert key.startswith("fsk_") and "12.5 credits" in created.stdout and "5 requests/min" in created.stdout
    assert keys("create", "--name", "team", "--credits", "1").exit_code != 0  # exists: use top-up
    assert keys("top-up", "team", "--credits", "7.5").exit_code == 0
    assert "balance 20 credits" in keys("list").stdout
    key_id = key.split("_")[1]
    assert keys("revoke", key_id).exit_code == 0
    listed = keys("list").stdout
    assert f"key {key_id}" in listed and "REVOKED" in listed and key.split("_", 2)[2] not in listed
    with accounts_of(tmp_path) as store:
        assert [e.kind for e in store.ledger()] == ["credit", "credit"]
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("jobs.sqlite3*"))
    assert key.split("_", 2)[2].encode() not in raw
