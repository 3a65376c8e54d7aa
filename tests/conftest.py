"""Shared fixtures: the tiny model (built once), and real servers started as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SLUG = "juggernaut-pro-flux"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`fluxserve serve` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, log_path: Path | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "FLUXSERVE_DATA_DIR": str(data_dir), "FLUXSERVE_PORT": str(self.port),
                    "FLUXSERVE_HOST": "127.0.0.1", **(env or {})}
        self.log_path = log_path or data_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxserve", "serve"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2).json()
                if health.get("engine") == "ready":
                    return
                if health.get("engine") == "failed":
                    raise RuntimeError(f"engine failed to load: {health}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from fluxserve.engine.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model):
    """One shared server on the tiny model; faults are armed only for prompts containing `__explode__`."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("server"),
        env={"FLUXSERVE_MODEL": str(tiny_model), "FLUXSERVE_FAULTS": "engine_error_on=__explode__"},
    ).start()
    yield srv
    srv.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def wait_status(client: httpx.Client, request_id: str, states=("COMPLETED", "FAILED"), timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v2/requests/{request_id}/status").json()
        if body.get("status") in states:
            return body
        time.sleep(0.1)
    raise TimeoutError(f"{request_id} not in {states} after {timeout}s: {body}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis for the tests: the one on 127.0.0.1:6379 when it answers, else one started here.

    Tests isolate themselves with a fresh key prefix (never a FLUSHDB), so sharing a server is safe.
    """
    from fluxserve.fleet import RedisServer, redis_answers

    if redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False).start()
    except FileNotFoundError:
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start")
    yield server.url
    server.kill()
