"""Cancel, deadlines, progress over Server-Sent Events and idempotent submits, on the real app in-process."""

from __future__ import annotations

import base64
import io
import json
import re
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from support.app import SLUG, running_app, shared_engine, wait_status
from support.faults import FaultyEngine


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """The app on the tiny model; the engine fails for prompts containing `__explode__`, and takes at least
    0.1 s a step for prompts containing `__slowsteps__`."""
    engine = FaultyEngine(shared_engine(tiny_model), error_on="__explode__", slow_on="__slowsteps__")
    with running_app(tmp_path_factory.mktemp("request-control"), engine=engine, model=str(tiny_model)) as app:
        yield app


@pytest.fixture()
def http(server):
    with server.http() as client:
        yield client


def submit(http: httpx.Client, headers=None, **body) -> str:
    response = http.post(
        f"/v2/{SLUG}", json={"width": 128, "height": 128, "steps": 2, **body}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def read_events(http: httpx.Client, url: str, **params) -> list[tuple[str, dict]]:
    """The whole event stream, parsed by hand from the wire format."""
    events, name, data = [], None, []
    with http.stream("GET", url, params=params, timeout=httpx.Timeout(10, read=120)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
            elif not line and data:
                events.append((name, json.loads("".join(data))))
                name, data = None, []
    return events


def stored_jobs(server, where: str, *args) -> list[sqlite3.Row]:
    db = sqlite3.connect(f"file:{server.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(f"SELECT * FROM jobs WHERE {where}", args).fetchall()
    finally:
        db.close()


def test_cancel_queued_and_processing_then_the_next_job_runs(http, server):
    running = submit(http, positivePrompt="cancel me while I run", width=512, height=512, steps=80)
    queued = submit(http, positivePrompt="cancel me while I wait")
    after = submit(http, positivePrompt="I run after the cancels")
    deadline = time.monotonic() + 120
    while (status := http.get(f"/v2/requests/{running}/status").json()).get("progress", {}).get(
        "step", 0
    ) < 1:
        assert status["status"] in ("QUEUED", "PROCESSING") and time.monotonic() < deadline
        time.sleep(0.05)
    assert http.get(f"/v2/requests/{queued}/status").json()["status"] == "QUEUED"

    for request_id in (queued, running):
        response = http.post(f"/v2/requests/{request_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "request_id": request_id,
            "status": "FAILED",
            "error": "Request cancelled by the client",
        }
        status = http.get(f"/v2/requests/{request_id}/status")
        assert status.status_code == 422 and "cancelled" in status.json()["error"]
    # Cancelling again is a 409 (it has ended, as the README says); an unknown request is a 404.
    assert http.post(f"/v2/requests/{running}/cancel").status_code == 409
    assert http.post(f"/v2/requests/{uuid.uuid4()}/cancel").status_code == 404

    assert wait_status(http, after)["status"] == "COMPLETED"
    assert http.post(f"/v2/requests/{after}/cancel").status_code == 409  # already ended

    log = server.log()
    assert f"job {queued} claimed" not in log  # the queued job never ran
    # The running job stopped at the step after its last recorded one: its next report was refused.
    stopped = re.search(rf"job {running} stopped at step (\d+) of 80", log)
    assert stopped, log[-3000:]
    (row,) = stored_jobs(server, "id = ?", running)
    assert int(stopped.group(1)) == json.loads(row["progress"])["step"] + 1 < 80
    assert http.get(f"/v2/media/{running}.jpg").status_code == 404


def test_deadline_cancels_automatically(http):
    by_header = submit(
        http,
        positivePrompt="deadline by header",
        # Seconds of work (the other job waits behind it): both deadlines pass before either could end.
        width=1024,
        height=1024,
        steps=100,
        headers={"Cancel-After": "1s"},
    )
    by_field = submit(http, positivePrompt="deadline by field", cancel_after=1)
    for request_id in (by_header, by_field):
        status = wait_status(http, request_id)
        assert status["status"] == "FAILED" and "deadline" in status["error"]
    assert http.post(f"/v2/{SLUG}", json={"positivePrompt": "x", "cancel_after": "soon"}).status_code == 400
    assert (
        http.post(f"/v2/{SLUG}", json={"positivePrompt": "x"}, headers={"Cancel-After": "0"}).status_code
        == 400
    )


def test_events_stream_monotonic_progress_to_100_then_the_result(http):
    submit(http, positivePrompt="a job ahead", width=512, height=512, steps=12)  # so we connect while QUEUED
    # Slowed (0.1 s a step): the stream, which samples the store, sees several steps, and the worker, which
    # asks whether anybody watches the previews twice a second, sees this stream before the job ends.
    request_id = submit(http, positivePrompt="watch me __slowsteps__", width=768, height=512, steps=16)
    events = read_events(http, f"/v2/requests/{request_id}/events", preview="true")
    names = [name for name, _ in events]
    assert names[-1] == "completed" and set(names[:-1]) == {"status"}
    assert events[0][1]["status"] == "QUEUED" and events[0][1]["queue_position"] >= 0
    assert events[-1][1] == http.get(f"/v2/requests/{request_id}").json()
    reports = [body["progress"] for name, body in events if name == "status" and "progress" in body]
    percents = [report["percent"] for report in reports]
    assert percents == sorted(percents) and percents[-1] == 100.0 and len(set(percents)) >= 2
    assert all(report["total"] == 16 and 0 <= report["step"] <= 16 for report in reports)
    previews = [report["preview"] for report in reports if "preview" in report]
    assert previews and previews[-1].startswith("data:image/jpeg;base64,")
    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
    assert preview.size == (96, 64)  # the latent's own resolution: 1/8 of the image
    # The status endpoint shows the same progress, without the preview unless the stream asks for it.
    plain = read_events(http, f"/v2/requests/{request_id}/events")
    assert plain[-1][0] == "completed" and all("preview" not in body.get("progress", {}) for _, body in plain)


def test_previews_are_made_only_for_a_stream_that_asks_for_them(http, server):
    unwatched = submit(http, positivePrompt="nobody watches my previews __slowsteps__", steps=12)
    assert read_events(http, f"/v2/requests/{unwatched}/events")[-1][0] == "completed"
    watched = submit(http, positivePrompt="watch my previews __slowsteps__", steps=12)
    assert read_events(http, f"/v2/requests/{watched}/events", preview="true")[-1][0] == "completed"
    # What the worker stored: no preview was made for the job followed without one.
    assert server.services.jobs.get(unwatched).progress["step"] == 12
    assert "preview" not in server.services.jobs.get(unwatched).progress
    assert server.services.jobs.get(watched).progress["preview"].startswith("data:image/jpeg;base64,")


def test_events_for_a_failed_request_end_with_failed(http):
    request_id = submit(http, positivePrompt="__explode__ in the stream")
    events = read_events(http, f"/v2/requests/{request_id}/events")
    assert events[-1][0] == "failed" and "injected" in events[-1][1]["error"]
    assert http.get(f"/v2/requests/{uuid.uuid4()}/events").status_code == 404


def test_concurrent_submits_with_one_idempotency_key_make_one_job(http, server):
    prompt = f"idempotent {uuid.uuid4()}"
    body = {"positivePrompt": prompt, "width": 128, "height": 128, "steps": 2}
    key = {"Idempotency-Key": str(uuid.uuid4())}

    def post(_):
        with server.http() as client:  # one client per thread, as separate callers would be
            return client.post(f"/v2/{SLUG}", json=body, headers=key)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 1
    assert len(stored_jobs(server, "params LIKE ?", f"%{prompt}%")) == 1
    (request_id,) = ids
    # The same key and body through v1 waits for that same job.
    image = http.post(f"/v1/{SLUG}", json=body, headers=key)
    assert image.status_code == 200 and image.headers["x-request-id"] == request_id
    # The same key with another body is refused, clearly.
    other = http.post(f"/v2/{SLUG}", json={**body, "steps": 3}, headers=key)
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["error"] and "different request" in other.json()["error"]
    assert http.post(f"/v2/{SLUG}", json=body, headers={"Idempotency-Key": ""}).status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]:9/hook",
        "http://10.0.0.7/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://2130706433/hook",
        "file:///etc/passwd",
        "ftp://203.0.113.9/hook",
        "not a url",
    ],
)
def test_webhook_targets_that_are_not_public_http_are_refused(http, url):
    response = http.post(f"/v2/{SLUG}", json={"positivePrompt": "x", "webhook": url})
    assert response.status_code == 400
    assert response.json()["error"].startswith("webhook: ")


def test_webhook_options_are_validated(http):
    body = {"positivePrompt": "x", "webhook": "https://203.0.113.9/hook"}
    bad = http.post(f"/v2/{SLUG}", json={**body, "webhook_events_filter": ["logs"]})
    assert bad.status_code == 400 and "webhook_events_filter" in bad.json()["error"]
    assert http.post(f"/v2/{SLUG}", json={**body, "webhook": 5}).status_code == 400
