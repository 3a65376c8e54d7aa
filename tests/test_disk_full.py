"""Disk-full drill on the SQLite default: a real `fluxserve serve` whose data dir is on a small tmpfs.

Jobs are queued and running when a filler file takes the last free byte. Meanwhile submits are 507
(or 503) with `{"error"}` and Retry-After, and `/ready` is 503 saying why. Once the filler is gone,
every job the API accepted ends COMPLETED: none is left QUEUED or PROCESSING, and none FAILED because
of the disk. After a clean stop the file passes `PRAGMA integrity_check` and the data dir holds no
temp files. Loopback only; every wait is bounded by the lease, the job time and /ready's cache.

Needs root and a kernel that lets it mount a tmpfs; skipped with the reason otherwise.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fluxserve.api.observability import READY_CACHE_SECONDS

from support.app import SLUG, wait_for
from support.processes import ServerProcess
from support.promises import MARGIN_S, START_BOUND_S

pytestmark = pytest.mark.drill

TMPFS_KB = 6144
JOB_SECONDS = 0.4
LEASE_SECONDS = 3.0
JOB = {"positivePrompt": "a lighthouse in a storm", "width": 128, "height": 128, "steps": 4}
# Files a write leaves behind when it fails half way (outputs' temp files, secrets' temp files, a
# rollback journal): none may be left once the drill is over.
TEMP_MARKERS = (".tmp-", "-journal", ".tmp")


@pytest.fixture()
def small_disk(tmp_path) -> Iterator[Path]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the disk-full drill mounts a tmpfs: it needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_KB}k,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(path: Path) -> int:
    """Write `path` until the filesystem has no byte left; the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as handle:
        while len(chunk) >= 1:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
    return written


def submit(http: httpx.Client) -> httpx.Response:
    return http.post(f"/v2/{SLUG}", json=JOB)


def states(http: httpx.Client, request_ids: list[str]) -> dict[str, str]:
    return {rid: http.get(f"/v2/requests/{rid}/status").json().get("status", "?") for rid in request_ids}


def test_a_full_disk_refuses_new_work_and_loses_none(small_disk, tmp_path):
    started = time.monotonic()
    data_dir = small_disk / "data"
    server = ServerProcess(data_dir, log_path=tmp_path / "server.log", env={
        "FLUXSERVE_MODEL": f"fake-sleep:{JOB_SECONDS}",
        "FLUXSERVE_LEASE_SECONDS": str(LEASE_SECONDS),
        "FLUXSERVE_RECLAIM_BACKOFF_SECONDS": "0",
        "FLUXSERVE_PREVIEWS": "false",
    }).start(timeout=START_BOUND_S)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/ready").status_code == 200
            accepted = [submit(http).json()["request_id"] for _ in range(8)]
            # The worker (ready) claims at once: one job runs, the others are queued.
            wait_for(lambda: set(states(http, accepted).values()) != {"QUEUED"}, timeout=MARGIN_S,
                     what="a job claimed by the ready worker")

            filler = small_disk / "filler"
            filled = fill(filler)
            full_since = time.monotonic()
            refused: list[httpx.Response] = []
            for _ in range(20):  # new work is refused, with a status a client can act on
                response = submit(http)
                if response.status_code == 200:
                    accepted.append(response.json()["request_id"])  # landed in space SQLite still had
                else:
                    refused.append(response)
                    if len(refused) >= 3:
                        break
            # /ready answers from a cache of READY_CACHE_SECONDS: it says why once that has passed.
            ready = wait_for(lambda: (r := http.get("/ready")).status_code == 503 and r,
                             timeout=READY_CACHE_SECONDS + MARGIN_S, what="/ready saying the disk is full")
            during = states(http, accepted)
            # The worker meets the full disk too (its next progress report or heartbeat, within a step).
            wait_for(lambda: "the job store is unavailable" in server.log(), timeout=LEASE_SECONDS + MARGIN_S,
                     what="the worker meeting the full disk")

            filler.unlink()
            full_for = time.monotonic() - full_since
            # Every accepted job ends: an abandoned one once its lease lapsed, then one after another.
            wait_for(lambda: all(state in ("COMPLETED", "FAILED") for state in states(http, accepted).values()),
                     timeout=LEASE_SECONDS + len(accepted) * JOB_SECONDS + MARGIN_S, what="every accepted job ended")
            ended = states(http, accepted)
            after_ready = wait_for(lambda: (r := http.get("/ready")).status_code == 200 and r,
                                   timeout=READY_CACHE_SECONDS + MARGIN_S, what="/ready once the disk has room")
            again = submit(http)
    finally:
        server.stop()
    log = server.log()
    print(f"\nfilled {filled // 1024} KiB; {len(refused)} submits refused "
          f"({sorted({r.status_code for r in refused})}); /ready while full: {ready.status_code} {ready.json()}; "
          f"states while full: {sorted(during.values())}; after {full_for:.1f}s full: {sorted(ended.values())}; "
          f"drill took {time.monotonic() - started:.1f}s")

    assert refused, "no submit was refused while the disk was full"
    for response in refused:
        assert response.status_code in (507, 503), response.text
        assert set(response.json()) == {"error"} and int(response.headers["retry-after"]) >= 1
    assert any(r.status_code == 507 and "disk" in r.json()["error"] for r in refused)
    assert ready.status_code == 503 and "cannot take writes" in ready.json()["error"], ready.json()
    assert set(ended.values()) == {"COMPLETED"}, ended  # none stuck, none FAILED for the disk
    assert after_ready.status_code == 200 and again.status_code == 200
    assert "internal error ref=" not in log

    database = data_dir / "jobs.sqlite3"
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    leftovers = [str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if any(m in p.name for m in TEMP_MARKERS)]
    assert not leftovers, leftovers
