"""Real processes on loopback: redis-server, `fluxserve serve`, API replicas and workers.

For the tests, the fault drills (tests/test_fleet.py) and the load bench (bench/load.py): every
process is a real subprocess reached over TCP on 127.0.0.1, with its output in a log file, and can be
killed (SIGKILL, as in a crash) or terminated (SIGTERM, a drain).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


class Process:
    """One child process with its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM, then wait for the process to exit by itself (SIGKILL after `timeout`); its exit code."""
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None


class RedisServer(Process):
    """redis-server on a free port; with `appendfsync always`, what it acknowledged survives SIGKILL."""

    def __init__(self, data_dir: Path, port: int | None = None, persistent: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
                *persistence]
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(args, data_dir / f"redis-{self.port}.log")

    def start(self, timeout: float = 20) -> RedisServer:
        super().start()
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):
            if not self.alive or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.log()}")
            time.sleep(0.05)
        return self


class FluxserveProcess(Process):
    """`python -m fluxserve <command>` on a free port; ready when `/ready` answers 200."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.command = command
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"FLUXSERVE_HOST": "127.0.0.1", "FLUXSERVE_PORT": str(self.port), **(env or {})}
        super().__init__([sys.executable, "-m", "fluxserve", *command], log_path, env)

    def is_ready(self) -> bool:
        """One readiness probe; raises when the process will never be ready."""
        response = httpx.get(f"{self.url}/ready", timeout=2)
        if response.status_code == 200:
            return True
        if "engine failed" in response.json().get("error", ""):  # waiting longer would not help
            raise RuntimeError(f"{self.command}: {response.text}\n{self.log()[-4000:]}")
        return False

    def wait_ready(self, timeout: float = 180) -> FluxserveProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if self.is_ready():
                    return self
            except httpx.HTTPError:  # not listening yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.command} not ready after {timeout}s:\n{self.log()[-4000:]}")


class ServerProcess(FluxserveProcess):
    """`fluxserve serve` (API and embedded worker) on its own data directory; ready once `/health`
    says the engine loaded."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.data_dir = data_dir
        port = free_port()
        super().__init__(["serve"], log_path or data_dir / f"server-{port}.log",
                         {"FLUXSERVE_DATA_DIR": str(data_dir), **(env or {})}, port=port)

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def is_ready(self) -> bool:
        health = httpx.get(f"{self.url}/health", timeout=2).json()
        if health.get("engine") == "failed":
            raise RuntimeError(f"engine failed to load: {health}")
        return health.get("engine") == "ready"

    def stop(self) -> None:
        self.terminate(timeout=20)


def api_replica(log_path: Path, env: dict[str, str]) -> FluxserveProcess:
    return FluxserveProcess(["serve", "--no-worker"], log_path, env)


def worker(log_path: Path, env: dict[str, str], *options: str) -> FluxserveProcess:
    return FluxserveProcess(["worker", *options], log_path, env)


def postgres_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def postgres_bin() -> Path | None:
    """Debian installs initdb/pg_ctl under /usr/lib/postgresql/<version>/bin only; the newest one."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A private PostgreSQL (initdb + pg_ctl) on a free port, in its own temp dir; it can be stopped and
    started again (the outage drills) and is removed at `destroy`. As root it runs as `postgres`."""

    def __init__(self, port: int | None = None) -> None:
        import tempfile

        bin_dir = postgres_bin()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL's initdb is not installed")
        self.bin = bin_dir
        self.port = port or free_port()
        # Not under pytest's tmp dir: its mode-700 parents would keep the `postgres` user out.
        self.root = Path(tempfile.mkdtemp(prefix="fluxserve-pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}\n{done.stderr}")

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-o", options, "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
