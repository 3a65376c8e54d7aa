"""Bad input gets `{"error": ...}` with the right status; unknown and expired ids answer 404."""

from __future__ import annotations

import time

import httpx
import pytest

from support.app import SLUG, running_app, shared_engine, wait_for, wait_status
from support.faults import FaultyEngine
from support.promises import MARGIN_S

VALID = {"positivePrompt": "a cat", "width": 128, "height": 128, "steps": 1}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model):
    """The real app in-process on the tiny model; the engine fails for prompts containing `__explode__`."""
    engine = FaultyEngine(shared_engine(tiny_model), error_on="__explode__")
    with running_app(tmp_path_factory.mktemp("errors"), engine=engine, model=str(tiny_model)) as app:
        yield app


@pytest.fixture()
def http(app):
    with app.http() as client:
        yield client

BAD_FIELDS = [
    # (field, value, word expected in the error)
    ("width", 127, "width"),
    ("width", 2049, "width"),
    ("width", "1024", "width"),
    ("width", 1024.5, "width"),
    ("width", True, "width"),
    ("height", 127, "height"),
    ("height", 2049, "height"),
    ("height", None, "height"),
    ("steps", 0, "steps"),
    ("steps", 101, "steps"),
    ("steps", "25", "steps"),
    ("seed", -2, "seed"),
    ("seed", 2**63, "seed"),
    ("seed", "1", "seed"),
    ("seed", 1.5, "seed"),
    ("CFGScale", -1, "CFGScale"),
    ("CFGScale", 31, "CFGScale"),
    ("CFGScale", "7", "CFGScale"),
    ("CFGScale", False, "CFGScale"),
    ("outputFormat", "GIF", "outputFormat"),
    ("outputFormat", "jpg", "outputFormat"),
    ("outputFormat", 1, "outputFormat"),
    ("scheduler", "NoSuchSampler", "scheduler"),
    ("scheduler", 3, "scheduler"),
    ("positivePrompt", "", "positivePrompt"),
    ("positivePrompt", "   ", "positivePrompt"),
    ("positivePrompt", 12, "positivePrompt"),
    ("positivePrompt", "x" * 10_001, "positivePrompt"),
    ("negativePrompt", "blurry", "negativePrompt"),
    ("base64", "yes", "base64"),
]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("field", "value", "word"), BAD_FIELDS)
def test_bad_parameter_is_400_naming_the_field(http, version, field, value, word):
    response = http.post(f"/{version}/{SLUG}", json={**VALID, field: value})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert word in body["error"]


@pytest.mark.parametrize(
    ("content", "word"),
    [
        (b"not json", "JSON"),
        (b"", "JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"\xff\xfe garbage", "JSON"),
        (b'{"positivePrompt": "a", ', "JSON"),
        (b"{}", "positivePrompt"),
        (b'{"positivePrompt": "' + b"a" * 70_000 + b'"}', "too large"),
    ],
)
def test_garbage_body_is_400(http, content, word):
    response = http.post(f"/v2/{SLUG}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert word in response.json()["error"]


def test_fractional_cfg_scale_is_accepted(http):
    assert http.post(f"/v2/{SLUG}", json={**VALID, "CFGScale": 3.5}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/requests/00000000-0000-4000-8000-000000000000/status", 404),
        ("GET", "/v2/requests/00000000-0000-4000-8000-000000000000", 404),
        ("GET", "/v2/requests/not-an-id/status", 404),
        ("GET", "/v2/media/00000000-0000-4000-8000-000000000000.jpg", 404),
        ("GET", "/v2/media/..%2F..%2Fetc%2Fpasswd", 404),
        ("POST", "/v1/no-such-model", 404),
        ("POST", "/v2/no-such-model", 404),
        ("GET", "/nowhere", 404),
        ("GET", f"/v1/{SLUG}", 405),
    ],
)
def test_unknown_things_are_json_errors(http, method, path, status):
    response = http.request(method, path, json=VALID if method == "POST" else None)
    assert response.status_code == status
    assert set(response.json()) == {"error"}


def test_api_key_header_is_accepted_and_ignored(http):
    response = http.post(f"/v2/{SLUG}", json=VALID, headers={"x-api-key": "sk-anything"})
    assert response.status_code == 200


def test_openapi_docs(http):
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    body = spec["paths"][f"/v2/{SLUG}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"positivePrompt", "width", "height", "steps", "seed", "CFGScale", "outputFormat", "scheduler"} <= set(
        body["properties"]
    )


def test_expired_job_is_404_everywhere(tmp_path):
    """Short retention; no model configured, so this also shows the demo default (`make run`) working:
    the app's own engine loader builds the tiny random-weight model under the data dir and serves it."""
    data = tmp_path / "data"
    with running_app(data, model="", retention_seconds=1.5, janitor_interval_seconds=0.3) as srv, srv.http() as http:
        health = http.get("/health").json()
        assert health["demo"] is True and "RANDOM-WEIGHT" in health["warning"]
        assert "RANDOM-WEIGHT" in srv.log()
        request_id = http.post(f"/v2/{SLUG}", json=VALID).json()["request_id"]
        assert wait_status(http, request_id)["status"] == "COMPLETED"
        result = http.get(f"/v2/requests/{request_id}").json()
        media_path = httpx.URL(result["output"]).path
        assert http.get(media_path).status_code == 200
        time.sleep(2)
        for path in (f"/v2/requests/{request_id}/status", f"/v2/requests/{request_id}", media_path):
            response = http.get(path)
            assert response.status_code == 404, path
            assert "error" in response.json()
        # The janitor deletes the file itself, not only the record.
        wait_for(lambda: not list((data / "outputs").glob(f"{request_id}.*")), timeout=MARGIN_S,
                 what="the janitor deleting the expired image")
