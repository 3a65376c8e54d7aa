"""A job accepted before a crash (SIGKILL) is done after the restart: none is lost."""

from __future__ import annotations

import httpx
import pytest

from conftest import SLUG, wait_status
from support.processes import ServerProcess
from support.promises import MARGIN_S

pytestmark = pytest.mark.drill

LEASE_SECONDS = 2.0


def test_sigkill_mid_queue_then_restart_completes_every_job(tmp_path, tiny_model):
    env = {"FLUXSERVE_MODEL": str(tiny_model), "FLUXSERVE_LEASE_SECONDS": str(LEASE_SECONDS),
           "FLUXSERVE_RECLAIM_BACKOFF_SECONDS": "0"}
    data = tmp_path / "data"
    first = ServerProcess(data, env=env).start()
    ids = []
    try:
        with httpx.Client(base_url=first.url, timeout=30) as http:
            # Long enough (about half a second each here) that the first is mid-run when the process dies;
            # the others wait behind it. Three prove it: one interrupted, two never started.
            for i in range(3):
                body = {"positivePrompt": f"durable job {i}", "width": 512, "height": 512, "steps": 8, "seed": i}
                response = http.post(f"/v2/{SLUG}", json=body)
                assert response.status_code == 200
                ids.append(response.json()["request_id"])
            wait_status(http, ids[0], states=("PROCESSING",), timeout=MARGIN_S)  # the ready worker claims at once
    finally:
        first.kill()

    second = ServerProcess(data, env=env).start()
    try:
        with httpx.Client(base_url=second.url, timeout=30) as http:
            # The crash really interrupted the work: the last job had not run yet.
            assert http.get(f"/v2/requests/{ids[-1]}/status").json()["status"] in ("QUEUED", "PROCESSING")
            for request_id in ids:  # the first once its lease lapsed, then one after another
                assert wait_status(http, request_id, timeout=LEASE_SECONDS + MARGIN_S)["status"] == "COMPLETED"
                result = http.get(f"/v2/requests/{request_id}").json()
                assert http.get(httpx.URL(result["output"]).path).status_code == 200
            # The job that was running when the process died was reclaimed after its lease lapsed.
            first_result = http.get(f"/v2/requests/{ids[0]}").json()
            assert first_result["metrics"]["attempts"] == 2
    finally:
        second.stop()
