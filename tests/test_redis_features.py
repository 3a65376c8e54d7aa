"""Request control on the Redis store, through the real app (in-process): cancel, progress, idempotent
submits and a webhook delivered to a loopback receiver (the store-level semantics are in the conformance suite)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import redis
from test_webhooks import Receiver

from support.app import SLUG, running_app, shared_engine, wait_for, wait_status
from support.stores import drop_prefix

SMALL = {"width": 128, "height": 128, "steps": 2}


@pytest.fixture()
def redis_server(tmp_path, tiny_model, redis_url):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with running_app(
        tmp_path / "data",
        engine=shared_engine(tiny_model),
        model=str(tiny_model),
        store=redis_url,
        redis_prefix=prefix,
        webhook_allow_private=True,  # the receiver is on loopback
        webhook_poll_seconds=0.2,
    ) as server:
        yield server, client, prefix
    drop_prefix(client, prefix)
    client.close()


def test_cancel_progress_idempotency_and_webhook_on_redis(redis_server):
    server, client, prefix = redis_server
    receiver = Receiver()
    try:
        with server.http() as http:

            def submit(headers=None, **body) -> httpx.Response:
                return http.post(f"/v2/{SLUG}", json={**SMALL, **body}, headers=headers)

            long = {"width": 512, "height": 512, "steps": 80}
            running = submit(positivePrompt="I run long", **long).json()["request_id"]
            queued = submit(positivePrompt="I wait").json()["request_id"]
            assert client.exists(f"{prefix}:job:{running}", f"{prefix}:job:{queued}") == 2  # stored in Redis

            # Progress reported while the job runs.
            progress = wait_for(
                lambda: http.get(f"/v2/requests/{running}/status").json().get("progress", {}).get("step"),
                what="a progress report",
            )
            assert progress >= 1

            # Cancel the queued job, then the running one (its worker's next report is refused).
            for request_id in (queued, running):
                response = http.post(f"/v2/requests/{request_id}/cancel")
                assert response.status_code == 200, response.text
                assert response.json()["status"] == "FAILED"
            assert "cancelled" in wait_status(http, running)["error"]
            assert f"job {queued} claimed" not in server.log()  # the queued job never ran

            # An idempotent submit, with a webhook: one job, one delivery.
            key = {"Idempotency-Key": str(uuid.uuid4())}
            body = {"positivePrompt": "once", "webhook": receiver.url("/ok")}
            first, again = submit(key, **body), submit(key, **body)
            assert first.status_code == again.status_code == 200
            request_id = first.json()["request_id"]
            assert again.json()["request_id"] == request_id
            assert submit(key, **{**body, "steps": 3}).status_code == 409
            assert wait_status(http, request_id)["status"] == "COMPLETED"

            (received,) = wait_for(lambda: receiver.requests("/ok"), what="the webhook")
            assert json.loads(received["body"])["request_id"] == request_id
            (delivery,) = wait_for(
                lambda: [d for d in http.get(f"/v2/requests/{request_id}").json()["webhook"]["deliveries"]
                         if d["state"] == "delivered"],
                what="the delivery on record",
            )
            assert delivery["id"] == received["id"]
            time.sleep(0.5)
            assert len(receiver.requests("/ok")) == 1  # delivered once
    finally:
        receiver.close()
