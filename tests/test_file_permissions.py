"""Files at rest: the data dir and everything the server writes into it are the operator's alone.

The real composition root opens the stores, makes the secrets and stores an output; modes are read back
with stat. Made private from the start (not loosened and tightened later), and an existing data dir
with looser modes is tightened at start with a warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from fluxserve.config import Settings
from fluxserve.contract import GenerateRequest
from fluxserve.jobs import Job, new_job_id
from fluxserve.services import Services


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def services_in(data: Path) -> Services:
    return Services(Settings(data_dir=data))


def close(services: Services) -> None:
    services.jobs.close()
    services.accounts.close()


def use(services: Services) -> None:
    """What a running server does to its data dir: a job written (the WAL), both secrets (in the database), one
    image."""
    services.jobs.submit(Job(id=new_job_id(), slug="m", params=GenerateRequest(positivePrompt="a cat")))
    services.webhook_owners.secret(None)
    services.outputs.put("x.png", b"\x89PNG not really")


EXPECTED = {
    "": 0o700,
    "jobs.sqlite3": 0o600,
    "jobs.sqlite3-wal": 0o600,
    "jobs.sqlite3-shm": 0o600,
    "outputs": 0o700,
    "outputs/x.png": 0o600,
}


@pytest.fixture()
def open_umask():
    """A umask that lets everyone read what is created, so only the code's own modes protect the files."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_new_data_dir_is_private_from_the_start(tmp_path, open_umask, caplog):
    data = tmp_path / "data"
    with caplog.at_level(logging.WARNING):
        services = services_in(data)
    try:
        use(services)
        assert {name: oct(mode(data / name)) for name in EXPECTED} == {
            name: oct(value) for name, value in EXPECTED.items()
        }
        assert not [p.name for p in (data / "outputs").iterdir() if p.name != "x.png"]  # no temp left
        assert "tightened" not in caplog.text  # made private, not fixed afterwards
    finally:
        close(services)


def test_an_existing_loose_data_dir_is_tightened_with_a_warning(tmp_path, open_umask, caplog):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "outputs").mkdir(mode=0o755)
    db = sqlite3.connect(data / "jobs.sqlite3")  # an old server's database, left world-readable
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE old (x)")
    for name in ("auth-secret", "webhook-secret"):
        (data / name).write_text("s" * 64 + "\n")
    for path in (data / "jobs.sqlite3", data / "auth-secret", data / "webhook-secret"):
        path.chmod(0o644)
    assert mode(data) == 0o755 and mode(data / "jobs.sqlite3") == 0o644

    with caplog.at_level(logging.WARNING):
        services = services_in(data)
    db.close()
    try:
        use(services)
        assert {name: oct(mode(data / name)) for name in EXPECTED} == {
            name: oct(value) for name, value in EXPECTED.items()
        }
        warned = " ".join(record.getMessage() for record in caplog.records)
        assert "tightened" in warned and str(data) in warned
    finally:
        close(services)
