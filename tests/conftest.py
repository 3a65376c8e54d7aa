"""Shared fixtures: the tiny model (built once), and real servers started as subprocesses."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import httpx
import pytest

from support.app import wait_status
from support.faults import faulty_server
from support.postgres import postgres_schema_url

# ServerProcess and free_port are re-exported: test modules import them from conftest.
from support.processes import PostgresServer, RedisServer, ServerProcess, free_port, postgres_answers, redis_answers
from support.stores import JOB_BACKENDS, job_store_factory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SLUG = "juggernaut-pro-flux"

__all__ = ["SLUG", "ServerProcess", "free_port", "wait_status"]


def run_dir(tmp_path_factory) -> Path:
    """A temp dir of this test run that every pytest-xdist worker of the run shares."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny model, built once per test run: the first worker builds it, the others wait for it."""
    from filelock import FileLock

    from fluxserve.engine.tiny import save_tiny_model

    root = run_dir(tmp_path_factory)
    model = root / "tiny-flux"
    with FileLock(str(root / "tiny-flux.lock")):
        if not model.exists():
            building = root / "tiny-flux.building"
            shutil.rmtree(building, ignore_errors=True)  # a build a crashed worker left half done
            save_tiny_model(building).rename(model)
    return model


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model):
    """One shared `serve` process on the tiny model; its engine fails for prompts containing `__explode__`
    and takes 0.1 s a step for prompts containing `__slowsteps__`."""
    srv = faulty_server(tmp_path_factory.mktemp("server"), env={"FLUXSERVE_MODEL": str(tiny_model)},
                        error_on="__explode__", slow_on="__slowsteps__").start()
    yield srv
    srv.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client




@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis for the tests: the one on 127.0.0.1:6379 when it answers, else one started here.

    Tests isolate themselves with a fresh key prefix (never a FLUSHDB), so sharing a server is safe.
    """
    if redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False).start()
    except FileNotFoundError:
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start")
    yield server.url
    server.kill()


@pytest.fixture(scope="session")
def postgres_server_url():
    """A PostgreSQL database for this test run: created on the server at 127.0.0.1:5432 when it answers
    (else on one started here with initdb/pg_ctl), dropped at the end."""
    import psycopg

    server = None
    # FLUXSERVE_TEST_POSTGRES=private always starts one here (as on a machine without PostgreSQL running).
    admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    if os.environ.get("FLUXSERVE_TEST_POSTGRES") == "private" or not postgres_answers(admin_url):
        try:
            server = PostgresServer().start()
        except FileNotFoundError:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432 and no initdb to start one")
        admin_url = server.url
    name = f"fluxserve_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    if server is not None:
        server.destroy()


@pytest.fixture()
def postgres_url(postgres_server_url):
    """A fresh schema of the run's database for one test (as a fresh key prefix is on Redis): the URL
    selects it through `search_path`, so every process given the URL sees the same tables."""
    return postgres_schema_url(postgres_server_url)


@pytest.fixture(params=JOB_BACKENDS)
def make_store(request, tmp_path):
    """A job store factory on each backend (SQLite, Redis, PostgreSQL), for the conformance suites."""
    make, cleanup = job_store_factory(request.param, request, tmp_path)
    yield make
    cleanup()


# The longest files first: `make test` hands whole files to two processes in collection order, and a
# long file started last would run alone at the end.
_LONG_FILES = ("test_multihost.py", "test_fleet.py", "test_lost_replies.py", "test_crash_loop.py", "test_speed.py",
               "test_store_faults.py", "test_durability.py", "test_bench.py", "test_jobstore_conformance.py",
               "test_k8s_drain.py", "test_cli.py", "test_webhooks.py", "test_model_options.py", "test_lora.py",
               "test_multi_model.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)

    items.sort(key=rank)  # stable: the order within each file is kept
