"""Hardening of the request core, in-process on the real app: bodies that cannot 500, idempotent replays
answered before admission, cancel after the end, media streamed from its store, and signed media links
that expire and die with their key."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import FileResponse

from fluxserve.app.access import ANONYMOUS
from fluxserve.app.body import MAX_JSON_DEPTH, json_depth
from fluxserve.engine.fake import SleepingEngine

from support.accounts import accounts_of, create_key, revoke_key
from support.app import SLUG, running_app, wait_status

TINY = {"positivePrompt": "a cat", "width": 128, "height": 128, "steps": 1}


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    """Keys off (loopback, no key), the fake engine: fast jobs that still run through the worker."""
    with running_app(tmp_path_factory.mktemp("open"), engine=SleepingEngine(0.0)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("keyed")
    keys = {
        "one-credit": create_key(data_dir, "one-credit", credits=1),
        "slow": create_key(data_dir, "slow", credits=10, rate=1),
        "alice": create_key(data_dir, "alice", credits=10),
    }
    with running_app(data_dir, engine=SleepingEngine(0.0), retention_seconds=3) as server:
        yield server, keys


# -- bodies --------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_that_says_so(open_app):
    with open_app.http() as http:
        for body in ("[" * 5000, '{"a":' * 2000 + "1" + "}" * 2000, json.dumps({"positivePrompt": [[[[[[[[]]]]]]]]})):
            response = http.post(f"/v2/{SLUG}", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"error"}
        assert "nests too deeply" in http.post(f"/v2/{SLUG}", content="[" * 5000,
                                               headers={"Content-Type": "application/json"}).json()["error"]


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"p": "[[[{{{\\"[[["}') == 1
    assert json_depth(b"[" * (MAX_JSON_DEPTH + 1)) == MAX_JSON_DEPTH + 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
prompt_like = st.fixed_dictionaries({"positivePrompt": st.text(min_size=1, max_size=40)},
                                    optional={"width": json_values, "steps": json_values, "webhook": json_values,
                                              "cancel_after": json_values, "seed": json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                      prompt_like.map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from([f"/v2/{SLUG}", f"/v1/{SLUG}", "/v2/requests/00000000-0000-4000-8000-000000000000/cancel"]))
def test_no_body_makes_a_5xx(open_app, body, path):
    with open_app.http() as http:
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


# -- idempotent replays ------------------------------------------------------------------------------


def test_replays_are_never_charged_or_throttled(keyed):
    server, keys = keyed
    for name in ("one-credit", "slow"):  # 1 credit in all; 1 request per minute
        with server.http(keys[name].key) as http:
            answers = [http.post(f"/v2/{SLUG}", json=TINY, headers={"Idempotency-Key": f"k-{name}"})
                       for _ in range(3)]
            assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
            assert len({a.json()["request_id"] for a in answers}) == 1
            wait_status(http, answers[0].json()["request_id"])
            # Only the first was admitted: a new request is refused for money or rate.
            fresh = http.post(f"/v2/{SLUG}", json=TINY)
            assert fresh.status_code == (406 if name == "one-credit" else 429), fresh.text
    with accounts_of(server.data_dir) as store:
        ledger = [e.kind for e in store.ledger(keys["one-credit"].account_id)]
    assert ledger.count("reserve") == 1 and ledger.count("charge") == 1


# -- cancel ----------------------------------------------------------------------------------------


def test_cancelling_an_ended_request_is_409_even_a_cancelled_one(tmp_path):
    with running_app(tmp_path, engine=SleepingEngine(30.0)) as slow, slow.http() as http:
        running = http.post(f"/v2/{SLUG}", json={**TINY, "steps": 30}).json()["request_id"]
        assert http.post(f"/v2/requests/{running}/cancel").status_code == 200
        again = http.post(f"/v2/requests/{running}/cancel")
        assert again.status_code == 409 and "already ended" in again.json()["error"]


# -- media -------------------------------------------------------------------------------------------


def test_media_is_streamed_from_the_file_with_ranges(open_app):
    with open_app.http() as http:
        request_id = http.post(f"/v2/{SLUG}", json={**TINY, "outputFormat": "PNG"}).json()["request_id"]
        wait_status(http, request_id)
        url = http.get(f"/v2/requests/{request_id}").json()["output"]
        whole = http.get(url)
        assert whole.status_code == 200 and whole.headers["content-type"] == "image/png"
        part = http.get(url, headers={"Range": "bytes=0-7"})
        assert part.status_code == 206 and part.content == whole.content[:8] == b"\x89PNG\r\n\x1a\n"
    found = open_app.services.results.media(f"{request_id}.png", {}, lambda: ANONYMOUS)
    assert found.path is not None and found.chunks is None  # sent from disk, never read whole
    assert isinstance(FileResponse(found.path), FileResponse)


# -- signed links ------------------------------------------------------------------------------------


def test_signed_links_expire_and_die_with_their_key(keyed):
    server, keys = keyed
    alice = keys["alice"]
    with server.http(alice.key) as http:
        request_id = http.post(f"/v2/{SLUG}", json=TINY).json()["request_id"]
        wait_status(http, request_id)
        url = http.get(f"/v2/requests/{request_id}").json()["output"]
    assert "exp=" in url and "kid=" in url and "sig=" in url
    with server.http() as anonymous:
        assert anonymous.get(url).status_code == 200  # the link works without the key
        tampered = url.replace("exp=", "exp=9")
        assert anonymous.get(tampered).status_code == 401  # not a valid link: the key decides
        revoke_key(server.data_dir, alice.key)
        revoked = anonymous.get(url)
        assert revoked.status_code == 403 and "revoked" in revoked.json()["error"]


def test_signed_links_expire_with_the_job(keyed):
    server, _ = keyed
    bob = create_key(server.data_dir, "bob", credits=5)
    with server.http(bob.key) as http:
        request_id = http.post(f"/v2/{SLUG}", json=TINY).json()["request_id"]
        wait_status(http, request_id)
        url = http.get(f"/v2/requests/{request_id}").json()["output"]
    expires = int(url.split("exp=")[1].split("&")[0])
    assert expires <= time.time() + 3 + 1  # the job's retention end (3 s here)
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    with server.http() as anonymous:
        gone = anonymous.get(url)
    assert gone.status_code in (403, 404) and set(gone.json()) == {"error"}
