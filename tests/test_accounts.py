"""The accounts layer on a real SQLite file: money moves exactly once, limits hold across processes
sharing the file, keys exist only as digests, and the auth mode decides who may start open."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fluxserve.accounts import NotEnoughCredits, TooManyInFlight
from fluxserve.accounts.keys import KeyRejected
from fluxserve.accounts.money import price, to_credits, to_micros
from fluxserve.accounts.sqlite import SqliteAccountStore
from fluxserve.app.access import Access, is_loopback
from fluxserve.app.billing import Billing
from fluxserve.config import AccountSettings, Settings
from fluxserve.contract import GenerateRequest
from fluxserve.jobs import Job, JobResult, new_job_id
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.jobs.sqlite import SqliteJobStore

from support.accounts import create_key

CREDIT = to_micros(1)


PARAMS = GenerateRequest(positivePrompt="a cat")
RESULT = JobResult(output_key="k.jpg", media_type="image/jpeg")


@contextmanager
def open_access(data_dir: Path, **flat) -> Iterator[Access]:
    settings = Settings(data_dir=data_dir, **flat)
    store = SqliteAccountStore(settings.sqlite_path)
    try:
        yield Access(settings.accounts, store, host=settings.host, data_dir=settings.data_dir)
    finally:
        store.close()


@pytest.fixture()
def store(tmp_path):
    store = SqliteAccountStore(tmp_path / "jobs.sqlite3")
    yield store
    store.close()


def new_account(store, name="alice", credits=10, rate=0.0, in_flight=0, models=None):
    return store.create_account(name, credits=to_micros(credits), rate_per_minute=rate, max_in_flight=in_flight,
                                models=models)


def assert_ledger_consistent(store, account_id):
    """Replaying the ledger gives the account's balance and reserved amount, row by row."""
    balance = reserved = 0
    for entry in store.ledger(account_id):
        balance += entry.amount
        reserved += entry.reserved_change
        assert (entry.balance_after, entry.reserved_after) == (balance, reserved)
    account = store.get_account(account_id)
    assert (account.balance, account.reserved) == (balance, reserved)
    assert reserved == sum(r.amount for r in store.open_reservations() if r.account_id == account_id)


def test_reserve_charge_release_and_the_ledger(store):
    account = new_account(store, credits=3)
    store.add_key("k1", account.id, "digest")
    store.reserve("job-a", account.id, "k1", CREDIT)
    store.reserve("job-b", account.id, "k1", CREDIT)
    assert store.get_account(account.id).available == CREDIT
    assert store.settle("job-a", charge=True)
    assert store.settle("job-b", charge=False)
    after = store.get_account(account.id)
    assert (after.balance, after.reserved) == (2 * CREDIT, 0)
    assert [e.kind for e in store.ledger(account.id)] == ["credit", "reserve", "reserve", "charge", "release"]
    assert_ledger_consistent(store, account.id)


def test_settling_twice_or_reserving_twice_moves_money_once(store):
    account = new_account(store, credits=2)
    store.add_key("k1", account.id, "digest")
    first = store.reserve("job", account.id, "k1", CREDIT)
    assert store.reserve("job", account.id, "k1", CREDIT) == first  # the same job: no second hold
    assert store.get_account(account.id).reserved == CREDIT
    assert store.settle("job", charge=True)
    assert not store.settle("job", charge=True)
    assert not store.settle("job", charge=False)
    assert store.get_account(account.id).balance == CREDIT
    assert_ledger_consistent(store, account.id)


def test_not_enough_credits_and_too_many_in_flight(store):
    account = new_account(store, credits=1.5, in_flight=2)
    store.add_key("k1", account.id, "digest")
    store.reserve("a", account.id, "k1", CREDIT)
    with pytest.raises(NotEnoughCredits) as exc:
        store.reserve("b", account.id, "k1", CREDIT)
    assert exc.value.available == to_micros(0.5)
    store.reserve("b", account.id, "k1", 0)
    with pytest.raises(TooManyInFlight):
        store.reserve("c", account.id, "k1", 0)
    store.settle("a", charge=False)
    store.reserve("c", account.id, "k1", 0)
    assert store.in_flight("k1") == 2


def test_the_schema_refuses_negative_balances_and_ledger_edits(store):
    account = new_account(store, credits=1)
    db = sqlite3.connect(store.file.path)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE accounts SET balance = -1 WHERE id = ?", (account.id,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE ledger SET amount = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM ledger")
    db.close()


def test_concurrent_reservations_from_two_processes_never_overspend(tmp_path):
    """Two stores on one file stand for two API processes; 120 racing reservations, credits for 30."""
    path = tmp_path / "jobs.sqlite3"
    stores = [SqliteAccountStore(path), SqliteAccountStore(path)]
    account = new_account(stores[0], credits=30)
    stores[0].add_key("k1", account.id, "digest")
    accepted, refused = [], []

    def submit(i: int) -> None:
        try:
            stores[i % 2].reserve(f"job-{i}", account.id, "k1", CREDIT)
            accepted.append(i)
        except NotEnoughCredits:
            refused.append(i)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(120)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(accepted), len(refused)) == (30, 90)
    for i in accepted:
        stores[i % 2].settle(f"job-{i}", charge=True)
        stores[(i + 1) % 2].settle(f"job-{i}", charge=True)  # the other process settles too: no effect
    final = stores[1].get_account(account.id)
    assert (final.balance, final.reserved) == (0, 0)
    assert_ledger_consistent(stores[0], account.id)
    for s in stores:
        s.close()


def test_rate_limit_is_shared_by_processes_on_one_store(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first, second = SqliteAccountStore(path), SqliteAccountStore(path)
    # 3 per minute: a burst of 3, then one every 20 s, whichever process the requests reach.
    assert [first.take_token("key:a", 3), second.take_token("key:a", 3), first.take_token("key:a", 3)] == [0, 0, 0]
    wait = second.take_token("key:a", 3)
    assert 19 < wait <= 20
    assert 19 < first.take_token("key:a", 3) <= 20  # a refused request does not push the wait further
    assert second.take_token("key:b", 3) == 0  # buckets are per key
    first.close()
    second.close()


def test_sweep_settles_jobs_the_worker_never_settled(tmp_path):
    """A crash between completing a job and settling it: the janitor's sweep charges it, once."""
    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")
    accounts = SqliteAccountStore(tmp_path / "jobs.sqlite3")
    account = new_account(accounts, credits=5)
    accounts.add_key("k1", account.id, "digest")
    done, failed, queued, orphan = (new_job_id() for _ in range(4))
    for job_id in (done, failed, queued, orphan):
        accounts.reserve(job_id, account.id, "k1", CREDIT)
    for job_id in (done, failed, queued):
        jobs.submit(Job(id=job_id, slug="m", params=PARAMS, owner=account.id))
    _, lease = jobs.claim("w")
    jobs.complete(lease, RESULT)
    _, lease = jobs.claim("w")
    jobs.fail(lease, "boom")
    billing = Billing(accounts, jobs, AccountSettings())

    assert billing.settle_open(orphan_after_seconds=3600) == 2
    assert billing.settle_open(orphan_after_seconds=3600) == 0
    assert {r.job_id for r in accounts.open_reservations()} == {queued, orphan}
    # The reservation whose job never reached the store is released once it is old enough.
    assert billing.settle_open(orphan_after_seconds=0) == 1
    assert accounts.get_reservation(orphan).state == "released"
    assert accounts.get_reservation(done).state == "charged"
    assert accounts.get_reservation(failed).state == "released"
    final = accounts.get_account(account.id)
    assert (final.balance, final.reserved) == (4 * CREDIT, CREDIT)  # one charged, the queued one held
    assert_ledger_consistent(accounts, account.id)
    jobs.close()
    accounts.close()


def test_a_retried_job_is_charged_once(tmp_path):
    """Attempt 1's lease lapses mid-run, attempt 2 completes; the stale worker's transitions fail,
    and however many settle calls follow (worker, v1 waiter, sweep), one charge is made."""
    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3", LeasePolicy(lease_seconds=0.05))
    accounts = SqliteAccountStore(tmp_path / "jobs.sqlite3")
    account = new_account(accounts, credits=1)
    accounts.add_key("k1", account.id, "digest")
    job_id = new_job_id()
    accounts.reserve(job_id, account.id, "k1", CREDIT)
    jobs.submit(Job(id=job_id, slug="m", params=PARAMS, owner=account.id))
    _, stale = jobs.claim("w1")
    time.sleep(0.1)
    _, lease = jobs.claim("w2")
    assert jobs.complete(lease, RESULT) and not jobs.complete(stale, RESULT)
    billing = Billing(accounts, jobs, AccountSettings())
    assert [billing.settle(jobs.get(job_id)) for _ in range(3)] == [True, False, False]
    assert billing.settle_open() == 0
    assert (accounts.get_account(account.id).balance, jobs.get(job_id).attempts) == (0, 2)
    assert [e.kind for e in accounts.ledger(account.id)] == ["credit", "reserve", "charge"]
    jobs.close()
    accounts.close()


def test_keys_are_digests_under_the_server_secret(tmp_path):
    with open_access(tmp_path) as access:
        account = new_account(access.store)
        record, key = access.keyring.issue(account.id)
        assert key.startswith(f"fsk_{record.id}_") and key not in record.digest
        assert access.keyring.authenticate(key) == (account, record)
        for wrong in ("", "fsk_", key[:-1] + ("A" if key[-1] != "A" else "B"), f"fsk_nope_{key.split('_', 2)[2]}"):
            with pytest.raises(KeyRejected, match="Invalid API key"):
                access.keyring.authenticate(wrong)
        assert access.store.revoke_key(record.id)
        with pytest.raises(KeyRejected, match="revoked"):
            access.keyring.authenticate(key)
    # The secret lives in the data dir (owner-only); another secret makes every key invalid.
    assert (tmp_path / "auth-secret").stat().st_mode & 0o077 == 0
    with open_access(tmp_path, auth_secret="x" * 40) as other, pytest.raises(KeyRejected):
        other.keyring.authenticate(key)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite3*"))
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw


@pytest.mark.parametrize(
    ("host", "auth", "keys", "enforced", "refused"),
    [
        ("127.0.0.1", "auto", False, False, False),  # a fresh `make run`: open
        ("127.0.0.1", "auto", True, True, False),
        ("localhost", "auto", False, False, False),
        ("::1", "auto", False, False, False),
        ("0.0.0.0", "auto", False, True, True),
        ("0.0.0.0", "required", False, True, True),
        ("0.0.0.0", "auto", True, True, False),
        ("0.0.0.0", "off", False, False, False),  # the explicit override
        ("192.168.1.20", "auto", False, True, True),
        ("example.org", "auto", False, True, True),
        ("127.0.0.1", "required", False, True, False),
        ("127.0.0.1", "off", True, False, False),
    ],
)
def test_auth_mode(tmp_path, host, auth, keys, enforced, refused):
    if keys:
        create_key(tmp_path, "alice")
    with open_access(tmp_path, host=host, auth=auth) as access:
        assert access.enforced() is enforced
        assert (access.refusal() is not None) is refused


def test_loopback_detection():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "myhost"]))


def test_price_depends_on_size_and_steps():
    size = (1000, 1000, 10)  # width, height, steps
    assert price(*size, per_image=0, per_megapixel_step=0) == 0
    assert price(*size, per_image=0.5, per_megapixel_step=0) == to_micros(0.5)
    assert price(*size, per_image=0.5, per_megapixel_step=0.01) == to_micros(0.6)
    billing = Billing(None, None, AccountSettings(price_per_image=0.5, price_per_megapixel_step=0.01))
    assert billing.price(GenerateRequest(positivePrompt="a cat", width=1000, height=1000, steps=10)) == to_micros(0.6)
    assert to_credits(to_micros("0.1") * 3) == 0.3
