"""What only the PostgreSQL JobStore has: LISTEN/NOTIFY wake-ups and their listener (latency, a lost
notification, a terminated backend, an unreachable server, close), migrations raced by replicas, and
a retried delivery attempt. The behaviour every backend shares is in test_jobstore_conformance.py."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

from fluxserve.contract import GenerateRequest, JobState
from fluxserve.jobs import Job, JobResult, new_job_id
from fluxserve.jobs.outbox import Delivery, new_delivery_id
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.jobs.postgres import _MIGRATIONS, _RECHECK_SECONDS, PostgresJobStore, _Listener

from conftest import free_port
from support.app import wait_for

# Every waiter below waits this long at most, and (but in the lost-notification test) re-reads the table
# only every RECHECK_S: a waiter that returns before its timeout was woken by a notification, however busy
# the machine. How soon it wakes is a latency, measured by bench/latency.py, not asserted here.
WAIT_S = 60.0
RECHECK_S = 3600.0
# The listener's longest pause between reconnects: a watch or a close that waited for the connection would
# take up to this; a prompt one returns well within it, even on a busy machine (a sanity bound).
PAUSE_S = _Listener._RECONNECT_MAX_S
POLICY = LeasePolicy(lease_seconds=30.0, max_attempts=2, retention_seconds=30.0, reclaim_backoff_seconds=0.0)


@pytest.fixture(autouse=True)
def notifications_only(monkeypatch):
    """Waiters re-read the table only every RECHECK_S: what wakes them sooner is a notification."""
    monkeypatch.setattr("fluxserve.jobs.postgres._RECHECK_SECONDS", RECHECK_S)


def woken(thread: threading.Thread, times: dict[str, float], what: str) -> None:
    """The waiter in `thread` returned before its own timeout (WAIT_S): something woke it."""
    thread.join(WAIT_S + 30)
    assert "woke" in times and times["woke"] - times["called"] < WAIT_S, f"not woken by {what}"


@pytest.fixture()
def open_store(postgres_url):
    """`open_store()` opens another handle on the test's schema (an API replica, a worker)."""
    opened: list[PostgresJobStore] = []

    def open_store() -> PostgresJobStore:
        store = PostgresJobStore.from_url(postgres_url, policy=POLICY)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def new_job(slug: str = "m") -> Job:
    return Job(id=new_job_id(), slug=slug, params=GenerateRequest(positivePrompt="a cat"))


def in_thread(target, *args) -> tuple[threading.Thread, dict[str, float]]:
    """Run `target(*args)`; the dict gets `called` and `woke`, the monotonic times it was called and returned."""
    times: dict[str, float] = {}

    def run() -> None:
        times["called"] = time.monotonic()
        target(*args)
        times["woke"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, times


def terminate(url: str, where: str, *args) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            f"AND pid <> pg_backend_pid() AND {where}", args,
        ).fetchall()
    return len(rows)


def listening(store: PostgresJobStore, previous: int | None = None) -> bool:
    pid = store._listener.pid
    return pid is not None and pid != previous


# -- wake-ups ------------------------------------------------------------------------------------


def test_a_submit_wakes_a_waiting_worker_at_once(open_store):
    api, worker = open_store(), open_store()
    for _ in range(3):
        thread, times = in_thread(worker.wait_for_work, ["m"], WAIT_S)
        time.sleep(0.3)  # most likely waiting by now (if not, it finds the job at once: the test still holds)
        api.submit(new_job())
        woken(thread, times, "the submit's notification")
        assert worker.claim("w", ["m"]) is not None


def test_a_waiter_is_not_woken_by_another_models_submit(open_store):
    api, worker = open_store(), open_store()
    thread, times = in_thread(worker.wait_for_work, ["other"], 0.6)
    time.sleep(0.2)
    api.submit(new_job("m"))
    thread.join(5)
    assert times["woke"] - times["called"] >= 0.6  # its whole timeout (timed in the thread: it may start late)
    # Waiting for any model: with a job already queued, it returns without waiting.
    thread, times = in_thread(worker.wait_for_work, None, WAIT_S)
    woken(thread, times, "the queued job")


def test_an_end_wakes_wait_terminal_at_once(open_store):
    api, worker = open_store(), open_store()
    for end in ("complete", "fail", "cancel"):
        job = api.submit(new_job())
        _, lease = worker.claim("w")
        thread, times = in_thread(api.wait_terminal, job.id, WAIT_S)
        time.sleep(0.3)
        if end == "complete":
            worker.complete(lease, JobResult("k", "image/png"))
        elif end == "fail":
            worker.fail(lease, "boom")
        else:
            worker.cancel(job.id, "cancelled")
        woken(thread, times, f"the job's end ({end})")


def test_a_slug_too_long_for_a_notification_wakes_every_waiter(open_store):
    api, worker = open_store(), open_store()
    slug = "m" * 9000  # NOTIFY refuses payloads of 8000 bytes and more
    thread, times = in_thread(worker.wait_for_work, ["m"], WAIT_S)
    time.sleep(0.3)
    job = api.submit(new_job(slug))
    woken(thread, times, "the notification for every waiter")
    assert worker.claim("w", [slug])[0].id == job.id


def test_a_lost_notification_costs_at_most_the_recheck(open_store, monkeypatch):
    api, worker = open_store(), open_store()
    for store in (api, worker):
        monkeypatch.setattr(store._listener, "_wake", lambda channel, key: None)  # every notification lost
    monkeypatch.setattr("fluxserve.jobs.postgres._RECHECK_SECONDS", _RECHECK_SECONDS)  # the real re-read, here
    # No notification arrives: the re-read every _RECHECK_SECONDS finds the work, long before the timeout.
    thread, times = in_thread(worker.wait_for_work, ["m"], WAIT_S)
    time.sleep(0.2)
    job = api.submit(new_job())
    woken(thread, times, f"the re-read every {_RECHECK_SECONDS}s")

    _, lease = worker.claim("w")
    thread, times = in_thread(api.wait_terminal, job.id, WAIT_S)
    time.sleep(0.2)
    worker.complete(lease, JobResult("k", "image/png"))
    woken(thread, times, f"the re-read every {_RECHECK_SECONDS}s")
    assert api.get(job.id).state is JobState.COMPLETED


# -- the listener's connection ------------------------------------------------------------------------


def test_the_listener_reconnects_after_its_backend_is_terminated(open_store, postgres_url):
    api, worker = open_store(), open_store()
    worker.wait_for_work(None, 0.01)  # starts the listener
    wait_for(lambda: listening(worker), timeout=5.0, what="the listener")
    old_pid = worker._listener.pid
    thread, times = in_thread(worker.wait_for_work, ["m"], WAIT_S)
    time.sleep(0.2)
    assert terminate(postgres_url, "pid = %s", old_pid) == 1
    api.submit(new_job())  # most likely sent while nobody listens: the reconnect wakes the waiter anyway
    woken(thread, times, "the listener's reconnect")
    wait_for(lambda: listening(worker, old_pid), timeout=5.0, what="the listener back")
    worker.claim("w")

    # Listening again: the next submit wakes a waiter through its notification.
    thread, times = in_thread(worker.wait_for_work, ["m"], WAIT_S)
    time.sleep(0.3)
    api.submit(new_job())
    woken(thread, times, "the submit's notification after the reconnect")


def test_every_connection_terminated_the_store_carries_on(open_store, postgres_url):
    """As after a database restart: the pool replaces its connections, the listener reconnects."""
    api, worker = open_store(), open_store()
    worker.wait_for_work(None, 0.01)
    wait_for(lambda: listening(worker), timeout=5.0, what="the listener")
    old_pid = worker._listener.pid
    assert terminate(postgres_url, "true") >= 3  # both pools and the listener
    assert api.ping() and worker.ping()
    job = api.submit(new_job())
    claimed, lease = worker.claim("w")
    assert claimed.id == job.id
    wait_for(lambda: listening(worker, old_pid), timeout=5.0, what="the listener back")
    thread, times = in_thread(api.wait_terminal, job.id, WAIT_S)
    time.sleep(0.3)
    assert worker.complete(lease, JobResult("k", "image/png"))
    woken(thread, times, "the job's end after every connection was replaced")


def test_an_unreachable_server_is_retried_with_backoff_and_close_is_prompt(caplog):
    listener = _Listener(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", ["fluxserve:t:queued"])
    with caplog.at_level(logging.WARNING, logger="fluxserve.jobs.postgres"):
        started = time.monotonic()
        with listener.watch("fluxserve:t:queued", "m") as event:  # returns although nothing listens
            assert time.monotonic() - started < PAUSE_S and not event.is_set()
            time.sleep(1.6)
        closing = time.monotonic()
        listener.close()
        assert time.monotonic() - closing < PAUSE_S
    attempts = [r for r in caplog.records if "reconnecting" in r.getMessage()]
    # Backoff 0.1, 0.2, 0.4, 0.8 s...: a handful of attempts in 1.6 s, not a spin.
    assert 2 <= len(attempts) <= 6
    assert listener._thread is not None and not listener._thread.is_alive()


def test_close_stops_the_listener_promptly(open_store, postgres_url):
    store = open_store()
    store.wait_for_work(None, 0.01)
    wait_for(lambda: listening(store), timeout=5.0, what="the listener")
    pid = store._listener.pid
    thread = store._listener._thread
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < PAUSE_S
    assert thread is not None and not thread.is_alive()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                      (pid,)).fetchone() == (0,), timeout=5.0, what="the listener's backend gone")
    assert not store.ping()


# -- schema, and a retried delivery attempt ------------------------------------------------------------


def test_migrations_are_applied_once_when_replicas_open_together(postgres_url):
    barrier = threading.Barrier(4)
    stores: list[PostgresJobStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            stores.append(PostgresJobStore.from_url(postgres_url, policy=POLICY))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == [] and len(stores) == 4
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT version FROM fluxserve_schema WHERE component = 'jobs' ORDER BY version").fetchall()
        assert rows == [(version,) for version in range(1, len(_MIGRATIONS) + 1)]  # each step once
        job = stores[0].submit(new_job())
        assert stores[3].get(job.id) is not None
    finally:
        for store in stores:
            store.close()


def test_a_retried_delivery_attempt_answers_true_and_records_nothing_twice(open_store):
    store = open_store()
    job = new_job()
    store.submit(job, deliveries=[Delivery(id=new_delivery_id(), job_id=job.id, url="https://example.invalid/h")])
    store.cancel(job.id, "cancelled")
    outbox = store.outbox()
    _, lease = outbox.claim_delivery("d")
    retry_at = time.time() + 60
    assert outbox.record_attempt(lease, {"status_code": 500}, "pending", retry_at)
    assert outbox.record_attempt(lease, {"status_code": 500}, "pending", retry_at)  # its reply was lost
    assert not outbox.record_attempt(lease, {"status_code": 200}, "delivered")  # another attempt: released
    (delivery,) = outbox.deliveries(job.id)
    assert delivery.state == "pending" and delivery.attempts == [{"status_code": 500}]
    assert delivery.next_attempt_at == pytest.approx(retry_at, abs=1.0)
    assert outbox.claim_delivery("d") is None  # not due for a minute
