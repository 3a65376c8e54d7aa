"""A store fault is never a job fault, and a sick store is visible.

Every fault here is real: a Redis server SIGKILLed and started again on its port (append-only file,
fsync always, so what it acknowledged survives), a Redis busy in a long script while a client's read
times out (the command still runs: an ambiguous failure), a SQLite write lock held by another
connection, SQLite files with overwritten pages. Workers and the app run in this process.

- the worker retries its store calls (progress, heartbeat, complete, fail) while the lease may hold and
  the job goes on; a heartbeat that cannot get through within the lease stops the work; a result that
  cannot be recorded in time leaves the job to be reclaimed; a claim that timed out is retried under
  the same token; the claim loop rides out an outage and logs it once; the generation failing is still
  the job's failure;
- the API answers a transient store fault 503 with Retry-After and `{"error"}` on every route, a submit
  the store kept as a successful submit, a submit it refused 503 with the credits given back; `/ready`
  is 503 while the store cannot take writes and probes it at most once a second; a held SQLite write
  lock (30 submits waiting) starves neither status reads nor `/ready`;
- a corrupt SQLite file is refused when it is opened, with a message that says what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
import redis
from PIL import Image
from redis.backoff import NoBackoff
from redis.retry import Retry

from fluxserve.api.errors import store_fault
from fluxserve.contract import GenerateRequest, JobState
from fluxserve.dbfile import CorruptDatabase, SqliteFile
from fluxserve.engine.fake import SleepingEngine
from fluxserve.engine.protocol import GenerationCancelled, GenerationParams
from fluxserve.jobs import Job, JobStore, new_job_id
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.jobs.redis import RedisJobStore
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.store_faults import StoreUnavailable
from fluxserve.worker import Worker

from support.accounts import accounts_of, create_key
from support.app import SLUG, running_app, wait_for, wait_status
from support.processes import RedisServer
from support.promises import MARGIN_S

pytestmark = pytest.mark.drill

SMALL = {"width": 128, "height": 128, "steps": 4}
SUBMIT = {"positivePrompt": "a lighthouse", **SMALL}

# A long script on another connection keeps Redis from answering anyone for ARGV[1] seconds; commands
# sent meanwhile run once it ends, even when their client gave up waiting.
BUSY_SCRIPT = """
local t = redis.call('TIME'); local start = t[1] * 1000000 + t[2]
while true do
  local n = redis.call('TIME')
  if (n[1] * 1000000 + n[2]) - start > tonumber(ARGV[1]) * 1000000 then break end
end
return 1
"""


# -- helpers -------------------------------------------------------------------------------------


class StagedEngine:
    """A fake engine (as `SleepingEngine`: sleeps, flat grey image) that records each run and lets a
    test act at the end of a run, where it breaks the store under the worker."""

    description = "staged fake engine (sleeps, no model)"

    def __init__(self, seconds: list[float], at_end: Callable[[int], None] | None = None,
                 fail_with: Exception | None = None) -> None:
        self.seconds = seconds  # per run; the last value for every later run
        self.at_end = at_end
        self.fail_with = fail_with
        self.started: list[float] = []
        self.cancelled: list[tuple[int, float]] = []  # (run, when)
        self.finished: list[int] = []

    def generate(self, params: GenerationParams, on_step=None, on_preview=None) -> Image.Image:
        run = len(self.started)
        self.started.append(time.monotonic())
        seconds = self.seconds[min(run, len(self.seconds) - 1)]
        try:
            for step in range(params.steps):
                time.sleep(seconds / params.steps)
                if on_step is not None:
                    on_step(step + 1, params.steps)
        except GenerationCancelled:
            self.cancelled.append((run, time.monotonic()))
            raise
        if self.at_end is not None:
            self.at_end(run)
        if self.fail_with is not None:
            raise self.fail_with
        self.finished.append(run)
        return Image.new("RGB", (params.width, params.height), (128, 128, 128))

    def metrics(self) -> dict:
        return {"engine": "staged"}


@pytest.fixture()
def redis_server(tmp_path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path / "redis").start()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    yield server
    server.kill()


def outage(server: RedisServer, seconds: float) -> threading.Thread:
    """SIGKILL the Redis server now; start it again (same port, same data) `seconds` later."""
    server.kill()

    def restart() -> None:
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=restart, name="redis-restart", daemon=True)
    thread.start()
    return thread


def fragile_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A client that does not retry by itself: every refused connection or timeout reaches its caller."""
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=1, socket_timeout=timeout,
                                retry=Retry(NoBackoff(), 0))


@pytest.fixture()
def redis_stores(redis_server) -> Iterator[Callable[..., tuple[RedisJobStore, RedisJobStore]]]:
    """`redis_stores(lease, timeout=2.0)`: (the worker's store, a second handle to submit and read
    with) on the test's server and a fresh key prefix; closed before the server is killed, so their
    listeners do not go on resubscribing to a dead server through the rest of the session."""
    opened: list[RedisJobStore] = []

    def open_pair(lease: float, timeout: float = 2.0) -> tuple[RedisJobStore, RedisJobStore]:
        prefix = f"faults-{uuid.uuid4().hex[:10]}"
        policy = LeasePolicy(lease_seconds=lease, reclaim_backoff_seconds=0)
        pair = (RedisJobStore(fragile_client(redis_server.url, timeout), prefix=prefix, policy=policy),
                RedisJobStore(redis.Redis.from_url(redis_server.url, decode_responses=True), prefix=prefix,
                              policy=policy))
        opened.extend(pair)
        return pair

    yield open_pair
    for store in opened:
        store.close()


def submit(store: JobStore, steps: int = 4) -> Job:
    params = GenerateRequest(positivePrompt="a lighthouse", width=128, height=128, steps=steps)
    return store.submit(Job(id=new_job_id(), slug="m", params=params))


def wait_state(store: JobStore, job_id: str, states: tuple[JobState, ...], timeout: float = 30) -> Job:
    def reached() -> Job | None:
        try:
            job = store.get(job_id)
        except redis.RedisError:
            return None
        return job if job is not None and job.state in states else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} in {states}")


def start_worker(store: JobStore, engine, tmp_path: Path, lease: float, poll: float = 0.2) -> Worker:
    worker = Worker(store, LocalOutputStore(tmp_path / "outputs"), engine, lease_seconds=lease, slugs=["m"],
                    idle_poll_seconds=poll)
    worker.start()
    return worker


def messages(caplog, needle: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if needle in record.getMessage()]


# -- the worker ----------------------------------------------------------------------------------


def test_a_redis_outage_mid_job_delays_the_job_and_never_fails_it(redis_stores, redis_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxserve")
    lease = 6.0
    worker_store, api = redis_stores(lease)
    engine = StagedEngine([3.0])
    worker = start_worker(worker_store, engine, tmp_path, lease)
    try:
        job = submit(api, steps=6)
        wait_for(lambda: engine.started, timeout=MARGIN_S, what="the run")
        time.sleep(0.3)
        outage(redis_server, 2.0).join()  # progress reports and a heartbeat meet a refused connection
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        worker.stop(timeout=10)
    assert done.state is JobState.COMPLETED, done.error
    assert done.attempts == 1  # never given up, never reclaimed
    assert engine.cancelled == [] and engine.finished == [0]
    assert messages(caplog, "retrying while the lease lasts")
    assert not messages(caplog, "abandoned")


def test_a_heartbeat_that_cannot_get_through_within_the_lease_stops_the_work(redis_stores, redis_server, tmp_path,
                                                                             caplog):
    caplog.set_level(logging.INFO, logger="fluxserve")
    lease = 2.0
    worker_store, api = redis_stores(lease)
    engine = StagedEngine([8.0, 0.4])
    worker = start_worker(worker_store, engine, tmp_path, lease)
    try:
        job = submit(api, steps=16)
        wait_for(lambda: engine.started, timeout=MARGIN_S, what="the first run")
        time.sleep(0.3)
        down_at = time.monotonic()
        restarted = outage(redis_server, 5.0)
        wait_for(lambda: engine.cancelled, timeout=MARGIN_S, what="the first run to stop")
        assert worker._thread is not None and worker._thread.is_alive()
        restarted.join()
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        worker.stop(timeout=10)
    (run, stopped_at), = engine.cancelled
    print(f"\nthe first run stopped {stopped_at - down_at:.2f}s into a 5s outage (lease {lease:g}s)")
    assert run == 0 and stopped_at - down_at < lease + 1.5  # stopped once the lease could have lapsed
    assert done.state is JobState.COMPLETED, done.error  # reclaimed, run again, never FAILED for the store
    assert done.attempts == 2 and engine.finished == [1]
    assert messages(caplog, "abandoned") or messages(caplog, "stopping job")


def test_a_result_recorded_after_a_short_outage_completes_the_job_once(redis_stores, redis_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxserve")
    lease = 6.0
    worker_store, api = redis_stores(lease)
    restarts: list[threading.Thread] = []
    engine = StagedEngine([0.4], at_end=lambda run: restarts.append(outage(redis_server, 1.5)) if run == 0 else None)
    worker = start_worker(worker_store, engine, tmp_path, lease)
    try:
        job = submit(api)
        wait_for(lambda: restarts, timeout=MARGIN_S, what="the outage")
        restarts[0].join()
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        worker.stop(timeout=10)
    assert done.state is JobState.COMPLETED and done.attempts == 1, done
    assert messages(caplog, f"recording the result of job {job.id} failed")
    assert (tmp_path / "outputs" / done.result.output_key).is_file()


def test_a_result_that_cannot_be_recorded_within_the_lease_is_left_for_the_queue(redis_stores, redis_server,
                                                                                 tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxserve")
    lease = 2.0
    worker_store, api = redis_stores(lease)
    restarts: list[threading.Thread] = []
    engine = StagedEngine([0.4], at_end=lambda run: restarts.append(outage(redis_server, 4.0)) if run == 0 else None)
    worker = start_worker(worker_store, engine, tmp_path, lease)
    try:
        job = submit(api)
        wait_for(lambda: restarts, timeout=MARGIN_S, what="the outage")
        restarts[0].join()
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        worker.stop(timeout=10)
    assert done.state is JobState.COMPLETED, done.error  # not FAILED: abandoned, reclaimed, run again
    assert done.attempts == 2 and engine.finished == [0, 1]
    assert any(f"job {job.id} abandoned" in m for m in messages(caplog, "recording the result"))


def test_a_generation_failure_is_still_the_jobs_failure_through_a_store_hiccup(redis_stores, redis_server, tmp_path):
    lease = 6.0
    worker_store, api = redis_stores(lease)
    restarts: list[threading.Thread] = []
    engine = StagedEngine([0.4], at_end=lambda run: restarts.append(outage(redis_server, 1.5)),
                          fail_with=RuntimeError("the sampler blew up"))
    worker = start_worker(worker_store, engine, tmp_path, lease)
    try:
        job = submit(api)
        wait_for(lambda: restarts, timeout=MARGIN_S, what="the outage")
        restarts[0].join()
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        worker.stop(timeout=10)
    assert done.state is JobState.FAILED and done.attempts == 1
    assert done.error == "Generation failed: RuntimeError: the sampler blew up"


def test_the_claim_loop_rides_out_an_outage_and_says_so_once(redis_stores, redis_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxserve")
    worker_store, api = redis_stores(lease=6.0)
    worker = start_worker(worker_store, SleepingEngine(0.0), tmp_path, lease=6.0, poll=0.1)
    try:
        time.sleep(0.3)
        outage(redis_server, 3.0).join()
        assert worker._thread is not None and worker._thread.is_alive()
        job = submit(api)
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        worker.stop(timeout=10)
    assert done.state is JobState.COMPLETED
    assert len(messages(caplog, "the job store is unavailable")) == 1  # many failed claims, one line
    assert len(messages(caplog, "the job store is available again")) == 1
    # The wake-up listener, too, says so once an outage (it once logged every 0.5 s until Redis was back).
    lost = messages(caplog, "lost the Redis pub/sub connection")
    assert lost and len(lost) == len(set(lost)), lost
    wait_for(lambda: len(messages(caplog, "Redis pub/sub on")) == len(lost), timeout=MARGIN_S, what="the listener back")


def test_a_claim_whose_answer_was_lost_is_retried_under_its_token(redis_stores, tmp_path):
    """The claim runs on the server after the worker's read timed out: its retry (same token) gets that
    job. Under a fresh token the job would sit leased to nobody until the lease lapsed (attempt 2)."""
    worker_store, api = redis_stores(lease=30.0, timeout=0.4)
    assert worker_store.claim("warm-up", ["no-such-model"]) is None  # the claim script is loaded
    job = submit(api)
    busy = threading.Thread(target=lambda: api.client.eval(BUSY_SCRIPT, 0, 1.5))
    busy.start()
    time.sleep(0.1)
    worker = start_worker(worker_store, SleepingEngine(0.0), tmp_path, lease=30.0)
    try:
        busy.join()
        done = wait_state(api, job.id, (JobState.COMPLETED, JobState.FAILED), timeout=MARGIN_S)
    finally:
        worker.stop(timeout=10)
    assert done.state is JobState.COMPLETED and done.attempts == 1, done


def test_a_held_sqlite_write_lock_delays_a_job_and_never_fails_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fluxserve")
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", LeasePolicy(lease_seconds=20.0))
    engine = StagedEngine([3.0])
    worker = start_worker(store, engine, tmp_path, lease=20.0)
    holder = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    try:
        job = submit(store, steps=6)
        wait_for(lambda: engine.started, timeout=MARGIN_S, what="the run")
        holder.execute("BEGIN IMMEDIATE")  # longer than a write waits (5 s): the worker's writes fail
        time.sleep(7.0)
        holder.execute("ROLLBACK")
        done = wait_state(store, job.id, (JobState.COMPLETED, JobState.FAILED))
    finally:
        holder.close()
        worker.stop(timeout=10)
        store.close()
    assert done.state is JobState.COMPLETED and done.attempts == 1, done
    assert any("database is locked" in m for m in messages(caplog, "retrying while the lease lasts"))


# -- the API -------------------------------------------------------------------------------------


def assert_unavailable(response: httpx.Response, status: int = 503) -> None:
    assert response.status_code == status, response.text
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"], body


@pytest.mark.parametrize(("error", "status"), [
    (sqlite3.OperationalError("database is locked"), 503),
    (StoreUnavailable("down"), 503),
    (redis.ConnectionError("Connection refused"), 503),
    (redis.exceptions.OutOfMemoryError("OOM command not allowed"), 507),
    (OSError(28, "No space left on device"), 507),
])
def test_transient_store_faults_map_to_503_or_507(error, status):
    from fluxserve.api.errors import STATUS_OF

    fault = store_fault(error)
    assert fault is not None and STATUS_OF[type(fault)] == status and fault.retry_after


def test_a_real_fault_is_not_mistaken_for_weather():
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorname = "SQLITE_CORRUPT"
    assert store_fault(corrupt) is None and store_fault(ValueError("bug")) is None


def test_a_redis_outage_is_503_with_retry_after_on_every_route(redis_server, tmp_path):
    with running_app(tmp_path / "data", engine=SleepingEngine(0.0), store=redis_server.url,
                     redis_prefix=f"api-{uuid.uuid4().hex[:8]}") as app, app.http() as http:
        queued = http.post(f"/v2/{SLUG}", json=SUBMIT).json()["request_id"]
        wait_status(http, queued)
        redis_server.kill()
        try:
            started = time.monotonic()
            ready = http.get("/ready")
            ready_seconds = time.monotonic() - started
            status = http.get(f"/v2/requests/{queued}/status")
            submitted = http.post(f"/v2/{SLUG}", json=SUBMIT)
            cancelled = http.post(f"/v2/requests/{queued}/cancel")
        finally:
            redis_server.start()
        log = app.log()
    print(f"\n/ready with Redis down answered in {ready_seconds:.2f}s: {ready.json()}")
    assert ready.status_code == 503 and ready_seconds < 2.0
    for response in (status, submitted, cancelled):
        assert_unavailable(response)
    assert "internal error ref=" not in log  # no 500 anywhere
    assert f"store unavailable on GET /v2/requests/{queued}/status: ConnectionError" in log


def test_a_submit_the_store_kept_is_answered_as_queued(redis_server, tmp_path):
    """The store runs the submit after the API's read timed out: the job is looked up, found, and the
    client gets its request_id (a 503 would make it submit the same job again)."""
    prefix = f"kept-{uuid.uuid4().hex[:8]}"

    impatient: list[RedisJobStore] = []

    def impatient_jobs(services) -> None:
        impatient.append(RedisJobStore(fragile_client(redis_server.url, timeout=0.4), prefix=prefix,
                                       policy=services.jobs.policy))
        services.submitter.jobs = impatient[0]

    with running_app(tmp_path / "data", engine=SleepingEngine(0.0), store=redis_server.url, redis_prefix=prefix,
                     setup=impatient_jobs) as app, app.http() as http:
        first = http.post(f"/v2/{SLUG}", json=SUBMIT)  # loads the submit script on the server
        assert first.status_code == 200, first.text
        admin = redis.Redis.from_url(redis_server.url)
        busy = threading.Thread(target=lambda: admin.eval(BUSY_SCRIPT, 0, 1.0))
        busy.start()
        time.sleep(0.1)
        response = http.post(f"/v2/{SLUG}", json=SUBMIT)
        busy.join()
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        assert wait_status(http, request_id)["status"] == "COMPLETED"
        assert f"submit of job {request_id} failed" in app.log() and "the store kept it" in app.log()
    impatient[0].close()


def test_a_submit_the_store_refused_is_503_and_gives_its_credits_back(tmp_path):
    data_dir = tmp_path / "data"
    key = create_key(data_dir, "alice", credits=10)  # accounts in the default file; jobs in another below
    queue_file = data_dir / "queue.sqlite3"
    with running_app(data_dir, engine=SleepingEngine(0.0), store=f"sqlite:///{queue_file}",
                     accounts_store=f"sqlite:///{data_dir / 'jobs.sqlite3'}") as app, app.http(key.key) as http:
        holder = sqlite3.connect(queue_file, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            response = http.post(f"/v2/{SLUG}", json=SUBMIT)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert_unavailable(response)
        assert "busy" in response.json()["error"] or "unavailable" in response.json()["error"]
        account = app.services.accounts.get_account(key.account_id)
        assert account is not None and account.reserved == 0
        assert not [r for r in app.services.accounts.open_reservations() if r.account_id == key.account_id]
        again = http.post(f"/v2/{SLUG}", json=SUBMIT)  # the store takes writes again
        assert again.status_code == 200 and wait_status(http, again.json()["request_id"])["status"] == "COMPLETED"
    with accounts_of(data_dir) as accounts:
        assert [r.job_id for r in accounts.ledger(key.account_id) if r.reserved_change < 0]  # released


def test_a_held_sqlite_write_lock_starves_neither_reads_nor_ready(tmp_path):
    """30 submits wait on a write lock another connection holds for 5 s; a status read and /ready answer
    at once meanwhile (they used to wait behind the submits for a thread)."""
    hold_seconds, submitters = 5.0, 30
    with running_app(tmp_path / "data", engine=SleepingEngine(0.0)) as app:
        with app.http() as http:
            done = http.post(f"/v2/{SLUG}", json=SUBMIT).json()["request_id"]
            wait_status(http, done)
        holder = sqlite3.connect(app.settings.sqlite_path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(hold_seconds, lambda: holder.execute("ROLLBACK"))

        async def drill(client: httpx.AsyncClient):
            answers: list[httpx.Response] = []
            timings: dict[str, float] = {}

            async def one_submit() -> None:
                answers.append(await client.post(f"/v2/{SLUG}", json=SUBMIT))

            async def timed(name: str, path: str) -> httpx.Response:
                started = time.monotonic()
                response = await client.get(path)
                timings[name] = time.monotonic() - started
                return response

            async with anyio.create_task_group() as group:
                release.start()
                for _ in range(submitters):
                    group.start_soon(one_submit)
                await anyio.sleep(1.0)  # every submit is waiting on the lock by now
                status = await timed("status", f"/v2/requests/{done}/status")
                ready = await timed("ready", "/ready")
            return answers, timings, status, ready

        try:
            answers, timings, status, ready = app.gather(drill, timeout=60)
        finally:
            release.join()
            holder.close()
        print(f"\nwhile {submitters} submits waited on a held write lock: status read {timings['status']:.3f}s, "
              f"/ready {timings['ready']:.3f}s ({ready.status_code}: {ready.json()}); submits: "
              f"{sum(a.status_code == 200 for a in answers)} queued, {sum(a.status_code == 503 for a in answers)} 503")
        assert status.status_code == 200 and timings["status"] < 2.0
        assert ready.status_code == 503 and timings["ready"] < 2.0
        assert "cannot take writes" in ready.json()["error"] and "locked" in ready.json()["error"]
        assert len(answers) == submitters
        for answer in answers:
            if answer.status_code != 200:
                assert_unavailable(answer)
        with app.http() as http:
            accepted = [a.json()["request_id"] for a in answers if a.status_code == 200]
            for request_id in accepted:
                assert wait_status(http, request_id)["status"] == "COMPLETED"
            wait_for(lambda: http.get("/ready").status_code == 200, timeout=MARGIN_S, what="/ready")


def test_ready_probes_the_store_at_most_once_a_second(tmp_path):
    calls: list[float] = []

    def count_probes(services) -> None:
        readiness = services.readiness

        def counted() -> dict[str, str]:
            calls.append(time.monotonic())
            return readiness()

        services.readiness = counted

    with running_app(tmp_path / "data", engine=SleepingEngine(0.0), setup=count_probes) as app, app.http() as http:
        calls.clear()
        started = time.monotonic()
        answers = [http.get("/ready") for _ in range(100)]
        elapsed = time.monotonic() - started
    assert all(a.status_code == 200 for a in answers)
    assert len(calls) <= elapsed / 1.0 + 1, (len(calls), elapsed)
    assert (tmp_path / "data" / "jobs.sqlite3").exists()


def test_ready_is_503_when_the_sqlite_file_cannot_take_writes(tmp_path):
    with running_app(tmp_path / "data", engine=SleepingEngine(0.0)) as app, app.http() as http:
        assert http.get("/ready").status_code == 200
        holder = sqlite3.connect(app.settings.sqlite_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # reads still work: only a write probe can tell
        try:
            time.sleep(1.1)  # past the cached answer
            ready = http.get("/ready")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert ready.status_code == 503 and ready.headers["retry-after"]
        assert ready.json()["error"].startswith("Not ready: store cannot take writes")
        wait_for(lambda: http.get("/ready").status_code == 200, timeout=MARGIN_S, what="/ready")


# -- a corrupt SQLite file -----------------------------------------------------------------------


def a_database(path: Path, jobs: int = 400) -> Path:
    store = SqliteJobStore(path)
    for i in range(jobs):
        params = GenerateRequest(positivePrompt=f"a lighthouse number {i} " + "x" * 200, width=128, height=128)
        store.submit(Job(id=new_job_id(), slug="m", params=params))
    store.file.db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return path


def overwrite_pages(path: Path, pages: range, offset: int, data: bytes) -> None:
    page_size = 4096
    with path.open("r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * page_size + offset)
            handle.write(data)


@pytest.mark.parametrize(("what", "pages", "offset"), [
    ("the schema page's b-tree header", range(1, 2), 100),  # quick_check raises SQLITE_CORRUPT
    ("b-tree page headers", range(3, 40, 3), 0),  # quick_check answers rows other than 'ok'
    ("cell pointers", range(3, 40, 3), 12),
    ("the file header", range(1, 2), 0),  # not a database at all
])
def test_a_corrupt_sqlite_file_is_refused_when_opened(tmp_path, what, pages, offset):
    original = a_database(tmp_path / "original.sqlite3")
    assert sqlite3.connect(original).execute("PRAGMA quick_check").fetchall() == [("ok",)]
    broken = tmp_path / "data" / "jobs.sqlite3"
    broken.parent.mkdir()
    shutil.copyfile(original, broken)
    overwrite_pages(broken, pages, offset, b"\xa5" * 64)
    with pytest.raises(CorruptDatabase) as refused:
        SqliteJobStore(broken)
    message = str(refused.value)
    print(f"\n{what}: {message}")
    assert "\n" not in message and str(broken) in message
    assert "backup" in message and "move it" in message
    SqliteFile(original).close()  # the intact original still opens


def test_serve_refuses_a_corrupt_data_dir_and_says_why(tmp_path):
    broken = tmp_path / "data" / "jobs.sqlite3"
    broken.parent.mkdir()
    shutil.copyfile(a_database(tmp_path / "original.sqlite3"), broken)
    overwrite_pages(broken, range(3, 40, 3), 0, b"\xa5" * 64)
    done = subprocess.run([sys.executable, "-m", "fluxserve", "serve", "--data-dir", str(broken.parent),
                           "--model", "fake-sleep:0"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "1000"})
    assert done.returncode != 0
    assert f"Refusing to open {broken}: the SQLite database is corrupt" in done.stdout + done.stderr
