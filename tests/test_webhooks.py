"""Webhooks end to end: a loopback receiver verifies Standard Webhooks signatures with the reference
`standardwebhooks` package, answers 500 twice, and the server is killed (SIGKILL, a real process) and
another server on the same data dir (the real app, in-process) takes over between attempts."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook

from fluxserve.webhooks.signing import new_secret
from fluxserve.webhooks.targets import webhook_client

from support.app import SLUG, running_app, shared_engine, wait_for, wait_status
from support.faults import faulty_server
from support.processes import free_port

SECRET = new_secret()
FAILURES_BEFORE_SUCCESS = 2


class Receiver:
    """A webhook receiver on loopback: `/hook` answers 500 twice per message, then 200;
    `/redirect` always answers 307 to `/target`, which must never be reached."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    message_id = self.headers.get("webhook-id")
                    seen = sum(
                        1 for r in receiver.received if r["id"] == message_id and r["path"] == self.path
                    )
                    if self.path == "/hook":
                        status = 500 if seen < FAILURES_BEFORE_SUCCESS else 200
                    elif self.path == "/redirect":
                        status = 307
                    else:
                        status = 200
                    receiver.received.append(
                        {
                            "path": self.path,
                            "id": message_id,
                            "headers": dict(self.headers),
                            "body": body,
                            "answered": status,
                        }
                    )
                self.send_response(status)
                if status == 307:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/target")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests(self, path: str = "/hook") -> list[dict]:
        with self.lock:
            return [r for r in self.received if r["path"] == path]

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


def deliveries(http: httpx.Client, request_id: str) -> list[dict]:
    return http.get(f"/v2/requests/{request_id}").json()["webhook"]["deliveries"]


@pytest.mark.drill
def test_signed_retried_durable_delivery(tmp_path, tiny_model, receiver):
    settings = {
        "model": str(tiny_model),
        "webhook_allow_private": True,  # the receiver is on loopback
        "webhook_secret": SECRET,
        "webhook_backoff_seconds": 2,  # retries 2 s and 4 s after a failure
        "webhook_poll_seconds": 0.2,
    }
    env = {f"FLUXSERVE_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
           for name, value in settings.items()}
    data = tmp_path / "data"
    # A real process, so that it can die without a clean stop; its engine fails on `__explode__`.
    first = faulty_server(data, env=env, error_on="__explode__").start(wait_ready=False)
    engine = shared_engine(tiny_model)  # for the server that takes over (loaded while the first starts)
    first.wait_ready()
    try:
        with httpx.Client(base_url=first.url, timeout=30) as http:

            def submit(prompt, **extra):
                body = {"positivePrompt": prompt, "width": 128, "height": 128, "steps": 2, **extra}
                response = http.post(f"/v2/{SLUG}", json=body)
                assert response.status_code == 200, response.text
                return response.json()["request_id"]

            completed = submit("webhook on completion", webhook=receiver.url("/hook"))
            failed = submit("webhook on __explode__", webhook=receiver.url("/hook"))
            started = submit(
                "webhook on start", webhook=receiver.url("/hook"), webhook_events_filter=["start"]
            )
            redirected = submit("webhook that redirects", webhook=receiver.url("/redirect"))
            hooked = (completed, failed, started)
            # Two failed attempts of every message are on record; then the server dies (no clean stop).
            wait_for(
                lambda: all(len(d["attempts"]) == 2 for job in hooked for d in deliveries(http, job))
                and deliveries(http, redirected)[0]["attempts"],
                what="two recorded attempts per message, and the redirect's first",
            )
            assert wait_status(http, completed)["status"] == "COMPLETED"
            redirect_attempts = deliveries(http, redirected)[0]["attempts"]
    finally:
        first.kill()
    assert all(r["answered"] == 500 for r in receiver.requests())  # nothing delivered before the crash

    # The next server on the same data dir delivers what the dead one left.
    with running_app(data, engine=engine, **settings) as second, second.http() as http:
        wait_for(
            lambda: all(deliveries(http, job)[0]["state"] == "delivered" for job in hooked),
            what="delivery after the restart",
        )
        results = {job: http.get(f"/v2/requests/{job}").json() for job in hooked}

    # Exactly one successful delivery per message, after two 500s; every request verifies.
    verifier = Webhook(SECRET)
    requests = receiver.requests()
    assert Counter(r["answered"] for r in requests) == {500: 6, 200: 3}
    by_job: dict[str, list[dict]] = {}
    for r in requests:
        payload = verifier.verify(r["body"], r["headers"])
        by_job.setdefault(payload["request_id"], []).append({**r, "payload": payload})
    assert set(by_job) == set(hooked)
    for job, got in by_job.items():
        assert [r["answered"] for r in got] == [500, 500, 200]
        assert len({r["id"] for r in got}) == 1  # one message id across its retries
        (delivery,) = results[job]["webhook"]["deliveries"]
        assert delivery["id"] == got[0]["id"] and delivery["state"] == "delivered"
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    # The body is the result endpoint's (without the delivery report), as it was at the event.
    # (Its media link has the base URL the request was submitted to: the first server's.)
    result_without_report = {k: v for k, v in results[completed].items() if k != "webhook"}
    payload = by_job[completed][-1]["payload"]
    assert httpx.URL(payload["output"]).path == httpx.URL(result_without_report["output"]).path
    assert {**payload, "output": None} == {**result_without_report, "output": None}
    assert (
        by_job[failed][-1]["payload"]["status"] == "FAILED"
        and "injected" in by_job[failed][-1]["payload"]["error"]
    )
    assert by_job[started][-1]["payload"]["status"] == "PROCESSING"
    assert results[started]["webhook"]["deliveries"][0]["event"] == "start"
    # A tampered body does not verify.
    with pytest.raises(Exception):  # noqa: B017 (whatever the library raises for a bad signature)
        verifier.verify(requests[-1]["body"] + b" ", requests[-1]["headers"])

    # Redirects are never followed.
    assert redirect_attempts[0]["status_code"] == 307 and "redirect" in redirect_attempts[0]["error"]
    assert receiver.requests("/target") == []


def test_delivery_connections_refuse_loopback_targets():
    """The connection-time guard (against DNS rebinding): no connection is even attempted."""
    with webhook_client(allow_private=False, timeout=5) as client, pytest.raises(httpx.ConnectError, match="loopback"):
        client.post("http://127.0.0.1:9/hook", content=json.dumps({}))
