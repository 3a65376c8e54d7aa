"""The CLI on a shared store: `fluxserve keys` needs no data dir, `fluxserve migrate` is safe to race,
and the SQLite default says which data dir it uses."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.drill


def fluxserve(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    return subprocess.run([sys.executable, "-m", "fluxserve", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["redis", "postgres"])
def shared_env(request) -> dict[str, str]:
    if request.param == "redis":
        return {"FLUXSERVE_STORE": request.getfixturevalue("redis_url"),
                "FLUXSERVE_REDIS_PREFIX": f"cli-{uuid.uuid4().hex[:10]}"}
    return {"FLUXSERVE_STORE": request.getfixturevalue("postgres_url")}


def test_keys_on_a_shared_store_need_no_data_dir(shared_env, tmp_path):
    """A key made on one 'host' is listed from another; neither writes a data dir."""
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    host_a.mkdir()
    host_b.mkdir()
    made = fluxserve(host_a, shared_env, "keys", "create", "--name", "ops", "--credits", "5")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().splitlines()[-1].startswith("fsk_")
    assert "store at" in made.stderr and "SQLite" not in made.stderr
    listed = fluxserve(host_b, shared_env, "keys", "list")
    assert listed.returncode == 0 and "ops" in listed.stdout, listed.stderr
    assert not (host_a / ".fluxserve").exists() and not (host_b / ".fluxserve").exists()


def test_sqlite_keys_say_which_data_dir(tmp_path):
    made = fluxserve(tmp_path, {"FLUXSERVE_DATA_DIR": str(tmp_path / "data")}, "keys", "list")
    assert made.returncode == 0, made.stderr
    assert f"SQLite file {(tmp_path / 'data' / 'jobs.sqlite3').resolve()}" in made.stderr


def test_migrate_races_safely_and_reports(postgres_url, tmp_path):
    env = {"FLUXSERVE_STORE": postgres_url}
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda _: fluxserve(tmp_path, env, "migrate"), range(3)))
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    outputs = "\n".join(run.stdout for run in runs)
    for component in ("jobs", "accounts", "outputs", "presence"):
        assert outputs.count(f"{component}: applied") == 1, outputs  # exactly one racer applied each
    again = fluxserve(tmp_path, env, "migrate")
    assert "jobs: up to date" in again.stdout and "schema ready on the postgres store" in again.stdout
