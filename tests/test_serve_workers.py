"""`fluxserve serve --workers N`: several API processes on one port, on a shared Redis store only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from conftest import SLUG
from support.processes import FluxserveProcess
from support.stores import drop_prefix

pytestmark = pytest.mark.drill


def server_children(pid: int) -> list[int]:
    """The uvicorn server processes under `pid` (multiprocessing's spawned children, not its resource tracker)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):  # the process ended while we looked
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            children.append(int(stat.parent.name))
    return children


def test_two_api_processes_share_a_port_and_the_redis_store(tmp_path, redis_url):
    prefix = f"fluxserve-test-workers-{uuid.uuid4().hex[:8]}"
    env = {"FLUXSERVE_STORE": redis_url, "FLUXSERVE_REDIS_PREFIX": prefix, "FLUXSERVE_DATA_DIR": str(tmp_path / "data"),
           "FLUXSERVE_LOG_LEVEL": "WARNING"}
    server = FluxserveProcess(["serve", "--no-worker", "--workers", "2"], tmp_path / "serve.log", env)
    try:
        server.start().wait_ready(timeout=60)
        children = server_children(server.proc.pid)
        assert len(children) == 2, server.log()[-3000:]
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/ready").status_code == 200
            submitted = http.post(f"/v2/{SLUG}", json={"positivePrompt": "two processes", "width": 128,
                                                        "height": 128, "steps": 2})
            assert submitted.status_code == 200, submitted.text
            job_id = submitted.json()["request_id"]
            # No worker runs it: it waits in the shared queue, whichever process answers.
            assert {http.get(f"/v2/requests/{job_id}/status").json()["status"] for _ in range(4)} == {"QUEUED"}
        assert server.terminate(timeout=30) == 0, server.log()[-3000:]
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    finally:
        server.kill()
        client = redis.Redis.from_url(redis_url)
        drop_prefix(client, prefix)
        client.close()


def test_workers_need_redis_and_no_embedded_worker(tmp_path, redis_url):
    outside = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}

    def serve(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fluxserve", "serve", "--workers", "2", *args],
                              env={**outside, "FLUXSERVE_DATA_DIR": str(tmp_path / "data"), **env},
                              capture_output=True, text=True, timeout=60)

    on_sqlite = serve("--no-worker")
    assert on_sqlite.returncode == 2
    assert "Refusing --workers 2" in on_sqlite.stderr and "FLUXSERVE_STORE=redis://" in on_sqlite.stderr
    embedded = serve(FLUXSERVE_STORE=redis_url)
    assert embedded.returncode == 2 and "--no-worker" in embedded.stderr
