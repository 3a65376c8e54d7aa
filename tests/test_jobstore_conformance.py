"""One conformance suite for every JobStore backend: transitions, leases, retention, races, order."""

from __future__ import annotations

import threading
import time

import pytest

from fluxserve.contract import GenerateRequest, JobState
from fluxserve.jobs import (
    Deadline,
    IdempotencyConflict,
    IdempotencyKey,
    Job,
    JobMeta,
    JobResult,
    Lease,
    WebhookTarget,
    new_job_id,
)
from fluxserve.jobs.outbox import Delivery, new_delivery_id

from support.stores import LEASE


@pytest.fixture()
def store(make_store):
    return make_store()


def request(n: int = 1) -> GenerateRequest:
    return GenerateRequest(positivePrompt="a cat", seed=n)


def result(key: str = "k") -> JobResult:
    return JobResult(output_key=key, media_type="image/png", metrics={"n": 1})


def new_job(n: int = 1) -> Job:
    return Job(id=new_job_id(), slug="m", params=request(n))


def submit(store, slug="m", i: int = 1) -> Job:
    return store.submit(Job(id=new_job_id(), slug=slug, params=request(i)))


def test_submitted_record_round_trips(store):
    meta = JobMeta(webhook=WebhookTarget("https://example.invalid/h", "http://api"), key_id="k1",
                   deadline=Deadline(5.0, 123.5), cost=1.5)
    params = GenerateRequest(positivePrompt="a cat", width=136, steps=3, outputFormat="PNG", scheduler="Heun")
    job = store.submit(Job(id=new_job_id(), slug="m", params=params, owner="acct-1", meta=meta))
    got = store.get(job.id)
    assert (got.slug, got.params, got.owner, got.meta, got.result) == ("m", params, "acct-1", meta, None)
    assert got.created_at == pytest.approx(job.created_at)
    _, lease = store.claim("w")
    store.complete(lease, result("x.png"))
    assert store.get(job.id).result == result("x.png")


def test_lifecycle_queued_processing_completed(store):
    job = submit(store)
    assert store.get(job.id).state is JobState.QUEUED
    assert store.queue_position(job.id) == 0
    claimed, lease = store.claim("w1")
    assert claimed.id == job.id and claimed.state is JobState.PROCESSING and claimed.attempts == 1
    assert store.queue_position(job.id) is None
    assert store.heartbeat(lease)
    assert store.complete(lease, result("k"))
    done = store.get(job.id)
    assert done.state is JobState.COMPLETED and done.result == result("k")
    assert done.finished_at >= done.created_at and done.expires_at > done.finished_at
    # Terminal is terminal: nothing moves it again (a repeated complete answers True, and changes nothing).
    assert not store.fail(lease, "late")
    assert store.complete(lease, result("other"))
    assert not store.heartbeat(lease)
    assert store.claim("w2") is None
    assert store.get(job.id) == done


def test_failed_keeps_its_error(store):
    job = submit(store)
    _, lease = store.claim("w1")
    assert store.fail(lease, "boom")
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and failed.error == "boom"


def test_unknown_id(store):
    assert store.get(new_job_id()) is None
    assert store.queue_position(new_job_id()) is None


def test_fifo_order_and_positions(store):
    jobs = [submit(store, i=i) for i in range(5)]
    assert [store.queue_position(job.id) for job in jobs] == [0, 1, 2, 3, 4]
    order = []
    while (claimed := store.claim("w")) is not None:
        order.append(claimed[0].id)
        store.complete(claimed[1], result())
    assert order == [job.id for job in jobs]


def test_claim_filters_by_slug(store):
    a = submit(store, slug="a")
    b = submit(store, slug="b")
    assert store.queue_position(b.id) == 0  # positions are per model
    assert store.claim("w", slugs=["b"])[0].id == b.id
    assert store.claim("w", slugs=["b"]) is None
    assert store.claim("w", slugs=["a", "c"])[0].id == a.id


def test_lapsed_lease_is_reclaimed_and_stale_owner_is_ignored(store):
    job = submit(store)
    _, old = store.claim("w1")
    assert store.claim("w2") is None  # leased: nobody else gets it
    time.sleep(LEASE + 0.1)
    reclaimed, new = store.claim("w2")
    assert reclaimed.id == job.id and reclaimed.attempts == 2 and new.token != old.token
    # The first worker comes back late: its heartbeat and its result change nothing.
    assert not store.heartbeat(old)
    assert not store.complete(old, result("old"))
    assert store.get(job.id).state is JobState.PROCESSING
    assert store.complete(new, result("new"))
    assert store.get(job.id).result == result("new")


def test_heartbeat_keeps_the_lease(store):
    submit(store)
    _, lease = store.claim("w1")
    for _ in range(4):
        time.sleep(LEASE / 2)
        assert store.heartbeat(lease)
    assert store.claim("w2") is None


def test_retry_budget_ends_failed(store):
    job = submit(store)
    for _ in range(2):  # max_attempts=2
        assert store.claim("w") is not None
        time.sleep(LEASE + 0.1)
    assert store.claim("w") is None
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and "stopped responding" in failed.error


# -- retried calls: a transition whose reply was lost is sent again -----------------------------------


def test_retried_claim_with_the_same_token_returns_the_same_job(store):
    job = submit(store, i=1)
    other = submit(store, i=2)
    token = "w1:retried-claim"
    first, lease = store.claim("w1", token=token)
    again, same = store.claim("w1", token=token)
    assert (first.id, again.id, lease, same) == (job.id, job.id, Lease(job.id, token), Lease(job.id, token))
    assert again.attempts == 1 and store.get(job.id).attempts == 1
    assert again.lease_expires_at == pytest.approx(first.lease_expires_at)  # no second lease
    # No other job was leased by the repeat: the next claim gets the second job.
    assert store.get(other.id).state is JobState.QUEUED and store.queue_position(other.id) == 0
    assert {state: n for state, n in store.count_by_state().items() if n} == {"QUEUED": 1, "PROCESSING": 1}
    assert store.claim("w2")[0].id == other.id
    assert store.complete(same, result())
    assert store.get(job.id).state is JobState.COMPLETED


def test_claim_with_a_token_leases_under_it(store):
    job = submit(store)
    claimed, lease = store.claim("w", token="w:chosen")
    assert lease == Lease(job.id, "w:chosen") and claimed.lease_token == "w:chosen"
    assert store.heartbeat(lease) and store.complete(lease, result())
    assert store.claim("w", token="w:chosen") is None  # ended: nothing is held under it, nothing queued


def test_retried_complete_answers_true_and_changes_nothing(store):
    job = submit(store)
    _, lease = store.claim("w")
    assert store.complete(lease, result("first"))
    done = store.get(job.id)
    assert store.complete(lease, result("first"))
    assert store.complete(lease, result("second"))  # a retry is recognised by its lease, not its payload
    assert not store.fail(lease, "boom")  # it ended COMPLETED, not FAILED
    assert store.get(job.id) == done and done.result == result("first")


def test_retried_fail_answers_true_and_changes_nothing(store):
    job = submit(store)
    _, lease = store.claim("w")
    assert store.fail(lease, "boom")
    failed = store.get(job.id)
    assert store.fail(lease, "boom")
    assert store.fail(lease, "another message")
    assert not store.complete(lease, result())  # it ended FAILED, not COMPLETED
    assert store.get(job.id) == failed and failed.error == "boom"


def test_a_stale_lease_still_answers_false(store):
    job = submit(store)
    _, old = store.claim("w1")
    time.sleep(LEASE + 0.1)
    _, new = store.claim("w2")
    assert not store.complete(old, result("old")) and not store.fail(old, "old")
    assert store.complete(new, result("new"))
    # Ended under the new lease: the old one is no repeat of it.
    assert not store.complete(old, result("old")) and not store.fail(old, "old")
    assert not store.complete(Lease(job.id, "someone-else"), result("x"))
    assert store.complete(new, result("new"))
    ended = store.get(job.id)
    assert ended.result == result("new") and ended.attempts == 2


def test_retried_delivery_claim_with_the_same_token_returns_the_same_delivery(store):
    first_job, first = submit_with_delivery(store)
    second_job, second = submit_with_delivery(store)
    for job in (first_job, second_job):
        store.cancel(job.id, "cancelled")
    outbox = store.outbox()
    claimed, lease = outbox.claim_delivery("d1", token="d1:retried")
    again, same = outbox.claim_delivery("d1", token="d1:retried")
    assert claimed.id == again.id and lease == same and lease.token == "d1:retried"
    other, _ = outbox.claim_delivery("d2")  # the repeat leased nothing else
    assert {claimed.id, other.id} == {first.id, second.id}
    assert outbox.claim_delivery("d3") is None
    assert outbox.record_attempt(same, {"status_code": 200}, "delivered")
    assert outbox.claim_delivery("d1", token="d1:retried") is None  # released: nothing held, nothing due


# -- reclaim backoff: a job whose worker died waits before it runs again ----------------------------

BACKOFF = 0.5
MARGIN = 0.15
# How long something must not have happened yet: wide enough that a pause of a busy machine between two
# store calls does not close it (the waits past it are timed from the call that opened it).
WINDOW = 1.0


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))


def test_reclaim_waits_for_the_backoff_and_doubles_per_attempt(make_store):
    store = make_store(reclaim_backoff_seconds=BACKOFF, max_attempts=3)
    job = submit(store)
    for attempt in (1, 2):
        claimed, _ = store.claim("w")
        lapses = time.monotonic() + LEASE  # the lease was taken just before: it lapses no later than this
        assert claimed.id == job.id and claimed.attempts == attempt
        delay = BACKOFF * 2 ** (attempt - 1)
        # Lapsed, and (from the second attempt) past the first attempt's delay too: still not claimable.
        sleep_until(lapses + (delay / 2 if attempt > 1 else 0.0) + MARGIN)
        assert store.claim("w") is None
        assert store.get(job.id).state is JobState.PROCESSING
        sleep_until(lapses + delay + MARGIN)
    claimed, _ = store.claim("w")
    lapses = time.monotonic() + LEASE
    assert claimed.id == job.id and claimed.attempts == 3
    # The last attempt's lease lapsed: the job fails only once its delay (2 s) has passed as well.
    sleep_until(lapses + 2 * BACKOFF + MARGIN)
    assert store.claim("w") is None
    assert store.get(job.id).state is JobState.PROCESSING
    sleep_until(lapses + 4 * BACKOFF + MARGIN)
    assert store.claim("w") is None
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and "stopped responding" in failed.error


def test_fresh_jobs_are_claimed_while_a_reclaimed_one_waits(make_store):
    store = make_store(reclaim_backoff_seconds=30.0)
    crashed = submit(store, i=1)
    fresh = [submit(store, i=i) for i in range(2, 4)]
    store.claim("w1")
    time.sleep(LEASE + 0.1)  # its worker died: the lease lapsed
    taken = [store.claim("w2") for _ in fresh]
    assert [got[0].id for got in taken] == [job.id for job in fresh]
    assert store.claim("w2") is None
    waiting = store.get(crashed.id)
    assert waiting.state is JobState.PROCESSING and waiting.attempts == 1


def test_retention_expiry(make_store):
    store = make_store(retention_seconds=0.5)
    job = submit(store)
    _, lease = store.claim("w")
    store.complete(lease, result("x"))
    assert store.get(job.id) is not None
    time.sleep(0.6)
    assert store.get(job.id) is None
    purged = store.purge_expired()
    assert [j.id for j in purged] == [job.id] and purged[0].result == result("x")
    assert store.purge_expired() == []


def test_unfinished_jobs_never_expire(make_store):
    store = make_store(retention_seconds=0.2)
    job = submit(store)
    time.sleep(0.3)
    assert store.purge_expired() == []
    assert store.get(job.id).state is JobState.QUEUED


def test_concurrent_claimers_never_share_a_job(make_store):
    stores = [make_store(lease_seconds=30) for _ in range(4)]
    ids = {submit(stores[0], i=i).id for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(store, name):
        while (got := store.claim(name)) is not None:
            with lock:
                claimed.append(got[0].id)
            assert store.complete(got[1], result())

    threads = [threading.Thread(target=work, args=(s, f"w{i}")) for i, s in enumerate(stores) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)  # each exactly once


def test_wait_terminal_wakes_on_completion(store):
    job = submit(store)
    _, lease = store.claim("w")
    timer = threading.Timer(0.3, store.complete, args=(lease, result()))
    timer.start()
    done = store.wait_terminal(job.id, timeout=60)  # returns at the end, not at its timeout: how soon is a bench's
    assert done.state is JobState.COMPLETED
    assert store.wait_terminal(submit(store).id, timeout=0.2).state is JobState.QUEUED


def test_ping(store):
    assert store.ping()


# -- progress and cancel ------------------------------------------------------------------------


def test_progress_is_written_only_under_the_lease(store):
    job = submit(store)
    assert store.get(job.id).progress is None
    _, lease = store.claim("w1")
    assert store.report_progress(lease, {"step": 1, "total": 4})
    assert store.get(job.id).progress == {"step": 1, "total": 4}
    assert not store.report_progress(Lease(job.id, "someone-else"), {"step": 9, "total": 4})
    assert store.get(job.id).progress == {"step": 1, "total": 4}
    store.complete(lease, result())
    assert not store.report_progress(lease, {"step": 2, "total": 4})


def test_reclaimed_job_starts_with_no_progress(store):
    job = submit(store)
    _, lease = store.claim("w1")
    store.report_progress(lease, {"step": 3, "total": 4})
    time.sleep(LEASE + 0.1)
    store.claim("w2")
    assert store.get(job.id).progress is None


def test_cancel_queued_job_never_runs(store):
    job = submit(store)
    cancelled = store.cancel(job.id, "cancelled by the client")
    assert cancelled.state is JobState.FAILED and cancelled.error == "cancelled by the client"
    assert cancelled.expires_at > cancelled.finished_at
    assert store.claim("w") is None
    assert store.queue_position(job.id) is None


def test_cancel_processing_job_revokes_the_lease(store):
    job = submit(store)
    _, lease = store.claim("w")
    assert store.cancel(job.id, "cancelled").state is JobState.FAILED
    # The worker learns it at its next step, and cannot finish the job any more. The job ended FAILED,
    # but not under this lease: the worker's own fail is not taken for a repeat either.
    assert not store.report_progress(lease, {"step": 2, "total": 4})
    assert not store.heartbeat(lease)
    assert not store.complete(lease, result("late"))
    assert not store.fail(lease, "late")
    cancelled = store.get(job.id)
    assert cancelled.error == "cancelled" and cancelled.result is None


def test_cancel_leaves_terminal_jobs_alone(store):
    job = submit(store)
    _, lease = store.claim("w")
    store.complete(lease, result("k"))
    after = store.cancel(job.id, "too late")
    assert after.state is JobState.COMPLETED and after.error is None
    assert store.cancel(new_job_id(), "x") is None


# -- idempotency keys ---------------------------------------------------------------------------


def test_idempotent_submit_returns_the_first_job(store):
    key = IdempotencyKey("key-1", "fingerprint-a")
    first = store.submit(Job(id=new_job_id(), slug="m", params=request(1)), idempotency=key)
    again = store.submit(Job(id=new_job_id(), slug="m", params=request(1)), idempotency=key)
    assert again.id == first.id
    assert store.claim("w")[0].id == first.id and store.claim("w") is None  # one job only
    with pytest.raises(IdempotencyConflict) as conflict:
        store.submit(Job(id=new_job_id(), slug="m", params=request(2)), idempotency=IdempotencyKey("key-1", "other"))
    assert conflict.value.job_id == first.id


def test_find_idempotent_answers_without_writing(store):
    key = IdempotencyKey("key-1", "fingerprint-a", "acct-1")
    assert store.find_idempotent(key) is None
    first = store.submit(new_job(), idempotency=key)
    assert store.find_idempotent(key).id == first.id
    assert store.find_idempotent(IdempotencyKey("key-1", "fingerprint-a", "acct-2")) is None  # another owner
    with pytest.raises(IdempotencyConflict) as conflict:
        store.find_idempotent(IdempotencyKey("key-1", "other", "acct-1"))
    assert conflict.value.job_id == first.id
    assert {state: n for state, n in store.count_by_state().items() if n} == {"QUEUED": 1}


def test_idempotency_keys_are_scoped_to_the_owner(store):
    mine = store.submit(new_job(), idempotency=IdempotencyKey("k", "f", "acct-1"))
    theirs = store.submit(new_job(), idempotency=IdempotencyKey("k", "f", "acct-2"))
    assert mine.id != theirs.id


def test_idempotency_key_expires_with_its_job(make_store):
    store = make_store(retention_seconds=0.3)
    key = IdempotencyKey("k", "f")
    first = store.submit(Job(id=new_job_id(), slug="m", params=request()), idempotency=key)
    _, lease = store.claim("w")
    store.complete(lease, result())
    time.sleep(0.4)
    second = store.submit(Job(id=new_job_id(), slug="m", params=request()), idempotency=IdempotencyKey("k", "other"))
    assert second.id != first.id and store.get(second.id).state is JobState.QUEUED


def test_concurrent_idempotent_submits_create_one_job(make_store):
    stores = [make_store() for _ in range(4)]
    ids: list[str] = []
    barrier = threading.Barrier(len(stores))

    def go(handle):
        barrier.wait()
        ids.append(handle.submit(new_job(), idempotency=IdempotencyKey("k", "f")).id)

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert stores[0].claim("w") is not None and stores[0].claim("w") is None


# -- the webhook outbox -------------------------------------------------------------------------


def submit_with_delivery(store, trigger="finished") -> tuple[Job, Delivery]:
    job = Job(id=new_job_id(), slug="m", params=request())
    delivery = Delivery(id=new_delivery_id(), job_id=job.id, url="https://example.invalid/hook", trigger=trigger)
    store.submit(job, deliveries=[delivery])
    return job, delivery


def test_finished_delivery_is_due_once_the_job_ends(store):
    job, delivery = submit_with_delivery(store)
    assert store.outbox().claim_delivery("d") is None  # QUEUED: not yet
    _, lease = store.claim("w")
    assert store.outbox().claim_delivery("d") is None  # PROCESSING: not yet
    store.fail(lease, "boom")
    claimed, _ = store.outbox().claim_delivery("d")
    assert (claimed.id, claimed.job_id, claimed.url, claimed.state) == (delivery.id, job.id, delivery.url, "pending")
    assert store.outbox().claim_delivery("d2") is None  # leased


def test_started_delivery_is_due_once_claimed(store):
    job, _ = submit_with_delivery(store, trigger="started")
    assert store.outbox().claim_delivery("d") is None
    store.claim("w")
    assert store.outbox().claim_delivery("d")[0].job_id == job.id


def test_cancelled_job_triggers_its_delivery(store):
    job, _ = submit_with_delivery(store)
    store.cancel(job.id, "cancelled")
    assert store.outbox().claim_delivery("d")[0].job_id == job.id


def test_attempts_are_recorded_and_retries_wait(store):
    job, _ = submit_with_delivery(store)
    store.cancel(job.id, "cancelled")
    _, lease = store.outbox().claim_delivery("d")
    due = time.time() + WINDOW
    assert store.outbox().record_attempt(lease, {"status_code": 500}, "pending", next_attempt_at=due)
    assert not store.outbox().record_attempt(lease, {"status_code": 200}, "delivered")  # lease released
    assert store.outbox().claim_delivery("d") is None  # not due yet
    time.sleep(max(0.0, due - time.time()) + 0.05)
    _, lease = store.outbox().claim_delivery("d")
    assert store.outbox().record_attempt(lease, {"status_code": 200}, "delivered")
    assert store.outbox().claim_delivery("d") is None
    (done,) = store.outbox().deliveries(job.id)
    assert done.state == "delivered" and [a["status_code"] for a in done.attempts] == [500, 200]


def test_lapsed_delivery_lease_is_reclaimed(store):
    job, _ = submit_with_delivery(store)
    store.cancel(job.id, "cancelled")
    _, old = store.outbox().claim_delivery("d1")
    time.sleep(LEASE + 0.1)
    _, new = store.outbox().claim_delivery("d2")
    assert not store.outbox().record_attempt(old, {"status_code": 200}, "delivered")
    assert store.outbox().record_attempt(new, {"status_code": 200}, "delivered")


def test_deliveries_go_with_their_job(make_store):
    store = make_store(retention_seconds=0.2)
    job, _ = submit_with_delivery(store)
    store.cancel(job.id, "cancelled")
    time.sleep(0.3)
    assert [j.id for j in store.purge_expired()] == [job.id]
    assert store.outbox().deliveries(job.id) == []
    assert store.outbox().claim_delivery("d") is None


def test_claim_without_filter_takes_the_oldest_of_any_model(store):
    first = submit(store, slug="b")
    second = submit(store, slug="a")
    assert [store.claim("w")[0].id, store.claim("w")[0].id] == [first.id, second.id]


def test_reclaimed_job_keeps_its_place_in_line(store):
    early = submit(store)
    late = submit(store)
    store.claim("w1")
    time.sleep(LEASE + 0.1)
    assert store.claim("w2")[0].id == early.id
    assert store.claim("w2")[0].id == late.id


def test_count_by_state(store):
    for _ in range(3):
        submit(store)
    _, lease = store.claim("w")
    store.complete(lease, result())
    _, lease = store.claim("w")
    nonzero = {state: n for state, n in store.count_by_state().items() if n}
    assert nonzero == {"QUEUED": 1, "PROCESSING": 1, "COMPLETED": 1}


def test_wait_terminal_wakes_on_an_end_made_by_another_handle(make_store):
    api, worker = make_store(), make_store()  # e.g. an API replica and a worker on another host
    job = submit(api)
    _, lease = worker.claim("w")
    threading.Timer(0.3, worker.fail, args=(lease, "boom")).start()
    ended = api.wait_terminal(job.id, timeout=60)
    assert ended.state is JobState.FAILED and ended.error == "boom"


# -- preview watchers ------------------------------------------------------------------------------------


def test_previews_are_watched_only_while_the_marker_lives(make_store):
    api, worker = make_store(), make_store()  # the API marks the job, a worker elsewhere asks
    job = submit(api)
    assert not worker.previews_watched(job.id)  # nobody asked
    marked = time.monotonic()
    api.watch_previews(job.id, WINDOW)
    assert worker.previews_watched(job.id)
    time.sleep(max(0.0, marked + WINDOW - time.monotonic()) + 0.1)
    assert not worker.previews_watched(job.id)  # the watcher went away without a word: the marker lapsed


def test_renewing_the_preview_marker_extends_it(store):
    job = submit(store)
    first = time.monotonic()
    store.watch_previews(job.id, WINDOW)
    time.sleep(WINDOW / 2)
    renewed = time.monotonic()
    store.watch_previews(job.id, WINDOW)
    time.sleep(max(0.0, first + WINDOW - time.monotonic()) + 0.1)  # past the first marker's end
    assert store.previews_watched(job.id)  # inside the renewed one's (for about WINDOW / 2 more)
    time.sleep(max(0.0, renewed + WINDOW - time.monotonic()) + 0.1)
    assert not store.previews_watched(job.id)


def test_preview_markers_are_per_job_and_never_raise(store):
    job, other = submit(store), submit(store)
    store.watch_previews(job.id, 30)
    store.watch_previews(job.id, 30)  # idempotent
    assert store.previews_watched(job.id) and not store.previews_watched(other.id)
    store.watch_previews(new_job_id(), 30)  # an unknown job: no error
    store.previews_watched(new_job_id())
    _, lease = store.claim("w")
    store.complete(lease, result())
    store.watch_previews(job.id, 30)  # an ended one: no error either


def test_preview_markers_go_with_their_job(make_store):
    store = make_store(retention_seconds=0.2)
    job = submit(store)
    store.watch_previews(job.id, 30)
    store.cancel(job.id, "cancelled")
    time.sleep(0.3)
    assert [j.id for j in store.purge_expired()] == [job.id]
    assert not store.previews_watched(job.id)
