"""Every AccountStore backend (SQLite, Redis, PostgreSQL) keeps the same promises: accounts, keys and
webhook settings; money that moves exactly once and never below zero, with a ledger that replays to
the balances; limits that hold under concurrent reservations from several handles ("processes"); a
rate limit shared by every handle; and server secrets created once however many processes race."""

from __future__ import annotations

import itertools
import multiprocessing
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from fluxserve.accounts import AccountStore, NotEnoughCredits, TooManyInFlight
from fluxserve.accounts.money import to_micros
from fluxserve.webhooks.signing import secret_bytes

from support.accounts import ACCOUNT_BACKENDS, assert_ledger_consistent, open_account_store, race_for_secrets
from support.stores import drop_prefix

CREDIT = to_micros(1)


@dataclass
class Backend:
    name: str
    where: str  # the SQLite file or the server's URL
    prefix: str  # Redis: this test's key space
    opened: list[AccountStore] = field(default_factory=list)

    def open(self) -> AccountStore:
        """Another handle on the same store: another API process, as far as the store can tell."""
        store = open_account_store(self.name, self.where, self.prefix)
        self.opened.append(store)
        return store


@pytest.fixture(params=ACCOUNT_BACKENDS)
def backend(request, tmp_path) -> Iterator[Backend]:
    name = request.param
    where = {
        "sqlite": lambda: str(tmp_path / "jobs.sqlite3"),
        "redis": lambda: request.getfixturevalue("redis_url"),
        "postgres": lambda: request.getfixturevalue("postgres_url"),  # a fresh schema for this test
    }[name]()
    backend = Backend(name, where, prefix=f"test-{uuid.uuid4().hex[:12]}")
    yield backend
    if name == "redis":
        client = backend.opened[0].client if backend.opened else None  # type: ignore[attr-defined]
        if client is not None:
            drop_prefix(client, backend.prefix)
    for store in backend.opened:
        store.close()


@pytest.fixture()
def store(backend) -> AccountStore:
    return backend.open()


def new_account(store, name="alice", credits=10.0, rate=0.0, in_flight=0, models=None):
    return store.create_account(name, credits=to_micros(credits), rate_per_minute=rate, max_in_flight=in_flight,
                                models=models)


# -- accounts, keys, webhook settings -------------------------------------------------------------------


def test_accounts(store):
    alice = new_account(store, "alice", credits=2.5, rate=30, in_flight=3, models=("a", "b"))
    bob = new_account(store, "bob", credits=0)
    assert (alice.name, alice.balance, alice.reserved, alice.available) == ("alice", to_micros(2.5), 0, to_micros(2.5))
    assert (alice.rate_per_minute, alice.max_in_flight, alice.models) == (30.0, 3, ("a", "b"))
    assert alice.allows("a") and not alice.allows("c") and bob.models is None and bob.allows("c")
    assert alice.created_at > 0 and alice.webhook_url is None
    secret_bytes(alice.webhook_secret)  # each account has its own signing secret, kept out of repr
    assert alice.webhook_secret != bob.webhook_secret and alice.webhook_secret not in repr(alice)
    assert store.get_account(alice.id) == alice
    assert store.find_account("bob") == bob
    assert store.get_account("nope") is None and store.find_account("carol") is None
    assert [a.name for a in store.list_accounts()] == ["alice", "bob"]
    assert new_account(store, "nobody", models=()).allows("a") is False  # an empty list allows nothing

    with pytest.raises(ValueError, match="already exists"):
        new_account(store, "alice")
    with pytest.raises(ValueError):
        new_account(store, "negative", credits=-1)
    assert [a.name for a in store.list_accounts()] == ["alice", "bob", "nobody"]

    [opening] = store.ledger(alice.id)
    assert (opening.kind, opening.amount, opening.reserved_change, opening.note) == (
        "credit", to_micros(2.5), 0, "opening balance")
    assert store.ledger(bob.id)[0].amount == 0  # even an empty opening balance is on the record

    topped = store.top_up(alice.id, CREDIT, note="invoice 7")
    assert topped.balance == to_micros(3.5)
    assert (store.ledger(alice.id)[-1].kind, store.ledger(alice.id)[-1].note) == ("credit", "invoice 7")
    assert store.top_up(alice.id, 1).balance == to_micros(3.5) + 1
    assert store.ledger(alice.id)[-1].note == "top-up"
    for amount in (0, -CREDIT):
        with pytest.raises(ValueError):
            store.top_up(alice.id, amount)
    with pytest.raises(KeyError):
        store.top_up("nope", CREDIT)
    assert_ledger_consistent(store, alice.id)


def test_keys(store):
    alice = new_account(store)
    assert not store.has_keys()
    first = store.add_key("k1", alice.id, "digest-1")
    second = store.add_key("k2", alice.id, "digest-2")
    assert (first.id, first.account_id, first.digest, first.revoked_at) == ("k1", alice.id, "digest-1", None)
    assert store.has_keys()
    assert store.get_key("k1") == first and store.get_key("nope") is None
    assert store.list_keys() == [first, second]
    with pytest.raises(ValueError):
        store.add_key("k1", alice.id, "another digest")
    with pytest.raises(KeyError):
        store.add_key("k3", "nope", "digest")

    assert store.revoke_key("k1")
    assert not store.revoke_key("k1")  # only the call that revoked it says so
    assert not store.revoke_key("nope")
    revoked = store.get_key("k1")
    assert revoked.revoked_at is not None and revoked.revoked_at >= first.created_at
    assert store.get_key("k2").revoked_at is None
    assert store.has_keys()  # revoked keys still count: keys were turned on


def test_webhook_settings(store):
    alice = new_account(store)
    hooked = store.set_webhook_url(alice.id, "https://example.com/hook")
    assert hooked.webhook_url == "https://example.com/hook" and hooked.webhook_secret == alice.webhook_secret
    assert store.get_account(alice.id).webhook_url == "https://example.com/hook"
    assert store.set_webhook_url(alice.id, None).webhook_url is None
    rotated = store.rotate_webhook_secret(alice.id)
    secret_bytes(rotated.webhook_secret)
    assert rotated.webhook_secret != alice.webhook_secret
    assert store.get_account(alice.id).webhook_secret == rotated.webhook_secret
    for change in (lambda: store.set_webhook_url("nope", "https://example.com"),
                   lambda: store.rotate_webhook_secret("nope")):
        with pytest.raises(KeyError):
            change()
    assert store.get_account("nope") is None  # asking about an unknown account made none


# -- money ---------------------------------------------------------------------------------------------


def test_reserve_charge_release_and_the_ledger(store):
    account = new_account(store, credits=3)
    store.add_key("k1", account.id, "digest")
    held = store.reserve("job-a", account.id, "k1", CREDIT)
    assert (held.job_id, held.account_id, held.key_id, held.amount, held.state, held.settled_at) == (
        "job-a", account.id, "k1", CREDIT, "open", None)
    store.reserve("job-b", account.id, "k1", CREDIT)
    assert store.get_account(account.id).available == CREDIT
    assert store.in_flight("k1") == 2
    assert [r.job_id for r in store.open_reservations()] == ["job-a", "job-b"]
    assert store.settle("job-a", charge=True)
    assert store.settle("job-b", charge=False)
    after = store.get_account(account.id)
    assert (after.balance, after.reserved) == (2 * CREDIT, 0)
    assert [e.kind for e in store.ledger(account.id)] == ["credit", "reserve", "reserve", "charge", "release"]
    assert [(e.amount, e.reserved_change) for e in store.ledger(account.id)[1:]] == [
        (0, CREDIT), (0, CREDIT), (-CREDIT, -CREDIT), (0, -CREDIT)]
    assert [e.job_id for e in store.ledger(account.id)] == [None, "job-a", "job-b", "job-a", "job-b"]
    charged, released = store.get_reservation("job-a"), store.get_reservation("job-b")
    assert (charged.state, released.state) == ("charged", "released")
    assert charged.settled_at >= charged.created_at
    assert store.get_reservation("nope") is None
    assert store.in_flight("k1") == 0 and store.open_reservations() == []
    assert_ledger_consistent(store, account.id)


def test_settling_twice_or_reserving_twice_moves_money_once(store):
    account = new_account(store, credits=2)
    store.add_key("k1", account.id, "digest")
    first = store.reserve("job", account.id, "k1", CREDIT)
    assert store.reserve("job", account.id, "k1", CREDIT) == first  # the same job: no second hold
    assert store.reserve("job", account.id, "k1", 2 * CREDIT) == first  # whatever the second call asks
    assert store.get_account(account.id).reserved == CREDIT
    assert store.settle("job", charge=True)
    assert not store.settle("job", charge=True)
    assert not store.settle("job", charge=False)
    assert not store.settle("never-reserved", charge=True)
    assert store.reserve("job", account.id, "k1", CREDIT).state == "charged"  # settled: not held again
    assert store.get_account(account.id).balance == CREDIT
    assert [e.kind for e in store.ledger(account.id)] == ["credit", "reserve", "charge"]
    assert_ledger_consistent(store, account.id)


def test_not_enough_credits_and_too_many_in_flight(store):
    account = new_account(store, credits=1.5, in_flight=2)
    store.add_key("k1", account.id, "digest")
    store.add_key("k2", account.id, "digest")
    store.reserve("a", account.id, "k1", CREDIT)
    with pytest.raises(NotEnoughCredits) as exc:
        store.reserve("too-dear", account.id, "k1", CREDIT)
    assert (exc.value.needed, exc.value.available) == (CREDIT, to_micros(0.5))
    store.reserve("b", account.id, "k1", 0)
    with pytest.raises(TooManyInFlight) as too_many:
        store.reserve("c", account.id, "k1", 0)
    assert too_many.value.limit == 2
    store.reserve("c", account.id, "k2", 0)  # the limit is per key
    store.settle("a", charge=False)
    store.reserve("d", account.id, "k1", 0)
    assert (store.in_flight("k1"), store.in_flight("k2"), store.in_flight("k3")) == (2, 1, 0)
    assert {r.job_id for r in store.open_reservations()} == {"b", "c", "d"}
    assert store.get_reservation("too-dear") is None  # a refused reservation leaves no trace
    with pytest.raises(KeyError):
        store.reserve("e", "no-such-account", "k1", 0)
    with pytest.raises(ValueError):
        store.reserve("f", account.id, "k1", -1)
    assert store.get_account(account.id).reserved == 0
    assert_ledger_consistent(store, account.id)


def test_the_ledger_of_every_account(store):
    alice, bob = new_account(store, "alice", credits=2), new_account(store, "bob", credits=2)
    for who in (alice, bob):
        store.add_key(f"key-{who.name}", who.id, "digest")
    store.reserve("a1", alice.id, "key-alice", CREDIT)
    store.reserve("b1", bob.id, "key-bob", CREDIT)
    store.settle("a1", charge=True)
    store.top_up(bob.id, CREDIT)
    everything = store.ledger()
    assert [(e.account_id, e.kind) for e in everything] == [
        (alice.id, "credit"), (bob.id, "credit"), (alice.id, "reserve"), (bob.id, "reserve"),
        (alice.id, "charge"), (bob.id, "credit")]
    assert [e.seq for e in everything] == sorted({e.seq for e in everything})  # unique and increasing
    assert all(later.at >= earlier.at for earlier, later in itertools.pairwise(everything))
    assert [e for e in everything if e.account_id == alice.id] == store.ledger(alice.id)
    assert store.ledger("nobody") == []
    for who in (alice, bob):
        assert_ledger_consistent(store, who.id)


def test_concurrent_reservations_never_overspend(backend):
    """20 threads on two handles (two API processes), released together: 60 reservations, credits for
    25, a limit of 40 in flight; then every reservation is settled by both handles at once."""
    handles = [backend.open(), backend.open()]
    account = new_account(handles[0], credits=25, in_flight=40)
    handles[0].add_key("k1", account.id, "digest")
    start = threading.Barrier(20)
    accepted: list[str] = []
    refused: list[str] = []
    errors: list[BaseException] = []

    def submit(thread: int) -> None:
        store = handles[thread % 2]
        try:
            start.wait(timeout=30)
            for n in range(3):
                job_id = f"job-{thread}-{n}"
                try:
                    store.reserve(job_id, account.id, "k1", CREDIT)
                    accepted.append(job_id)
                except NotEnoughCredits:
                    refused.append(job_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_threads(submit, 20)
    assert not errors
    assert (len(accepted), len(refused)) == (25, 35)
    held = handles[1].get_account(account.id)
    assert (held.balance, held.reserved) == (25 * CREDIT, 25 * CREDIT)
    assert handles[0].in_flight("k1") == 25
    assert_ledger_consistent(handles[0], account.id)

    settled: list[bool] = []
    start = threading.Barrier(20)

    def settle(thread: int) -> None:
        start.wait(timeout=30)
        for job_id in accepted[thread // 2::10]:  # each job settled by two threads, one per handle
            settled.append(handles[thread % 2].settle(job_id, charge=True))

    run_threads(settle, 20)
    assert (settled.count(True), settled.count(False)) == (25, 25)
    final = handles[1].get_account(account.id)
    assert (final.balance, final.reserved) == (0, 0)
    ledger = handles[0].ledger(account.id)
    assert [e.kind for e in ledger].count("charge") == 25
    assert sum(e.amount for e in ledger) == 0 and sum(e.reserved_change for e in ledger) == 0
    assert_ledger_consistent(handles[1], account.id)


def run_threads(target: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)


def test_the_store_itself_refuses_a_negative_balance(backend):
    """Whoever writes to the store directly, bypassing the store's Python checks, meets the rules."""
    store = backend.open()
    account = new_account(store, credits=1)
    store.add_key("k1", account.id, "digest")
    store.reserve("job", account.id, "k1", CREDIT)
    before = (store.get_account(account.id), store.ledger(account.id))
    {"sqlite": sqlite_refuses, "redis": redis_refuses, "postgres": postgres_refuses}[backend.name](
        backend, store, account.id)
    assert (store.get_account(account.id), store.ledger(account.id)) == before
    assert store.get_reservation("job").state == "open"


def sqlite_refuses(backend, store, account_id):
    db = sqlite3.connect(backend.where)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE accounts SET balance = -1 WHERE id = ?", (account_id,))
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE accounts SET reserved = balance + 1 WHERE id = ?", (account_id,))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE ledger SET amount = 0")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM ledger")
    finally:
        db.close()


def redis_refuses(backend, store, account_id):
    import redis

    run = store._run  # the scripts themselves, without the Python checks in front of them
    with pytest.raises(redis.ResponseError, match="positive"):
        run("TOP_UP", account_id, -5 * CREDIT, "", uuid.uuid4().hex)
    with pytest.raises(redis.ResponseError, match="non-negative"):
        run("RESERVE", "job-2", account_id, "k1", -CREDIT)
    with pytest.raises(redis.ResponseError, match="negative"):
        run("CREATE", uuid.uuid4().hex, "mallory", -CREDIT, "0", 0, "", "whsec_x")
    # A reservation record tampered with to hold more than the account owns: settling it would take
    # the balance below zero, and the script's move refuses before writing anything.
    record = f"{backend.prefix}:accounts:reservation:job"
    store.client.hset(record, "amount", str(5 * CREDIT))
    for charge in ("1", "0"):
        with pytest.raises(redis.ResponseError, match="balance"):
            run("SETTLE", "job", charge, uuid.uuid4().hex)
    store.client.hset(record, "amount", str(CREDIT))
    assert store.find_account("mallory") is None


def postgres_refuses(backend, store, account_id):
    import psycopg
    from psycopg import errors

    with psycopg.connect(backend.where, autocommit=True) as conn:
        with pytest.raises(errors.CheckViolation):
            conn.execute("UPDATE accounts SET balance = -1 WHERE id = %s", (account_id,))
        with pytest.raises(errors.CheckViolation):
            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (account_id,))  # < reserved
        with pytest.raises(errors.CheckViolation):
            conn.execute("UPDATE accounts SET reserved = -1 WHERE id = %s", (account_id,))
        for statement in ("UPDATE ledger SET amount = 0", "DELETE FROM ledger", "TRUNCATE ledger"):
            with pytest.raises(errors.RaiseException, match="append-only"):
                conn.execute(statement)
        with pytest.raises(errors.CheckViolation):
            conn.execute(
                "INSERT INTO ledger (account_id, kind, amount, reserved_change, balance_after, reserved_after) "
                "VALUES (%s, 'refund', 0, 0, 0, 0)", (account_id,))


# -- rate limits -------------------------------------------------------------------------------------


def test_rate_limit_is_shared_by_two_handles(backend):
    first, second = backend.open(), backend.open()
    # 3 per minute: a burst of 3, then one every 20 s, whichever process the requests reach.
    assert [first.take_token("key:a", 3), second.take_token("key:a", 3), first.take_token("key:a", 3)] == [0, 0, 0]
    wait = second.take_token("key:a", 3)
    assert 19 < wait <= 20
    assert 19 < first.take_token("key:a", 3) <= wait  # a refused request does not push the wait further
    assert second.take_token("key:b", 3) == 0  # buckets are per key
    assert first.take_token("key:c", 0.5) == 0 and 119 < second.take_token("key:c", 0.5) <= 120  # burst of 1
    assert [first.take_token("key:d", 0) for _ in range(5)] == [0] * 5  # 0 = unlimited


def test_rate_limit_under_concurrent_requests(backend):
    """60 per minute from 10 threads on two handles: exactly the burst of 60 goes through."""
    handles = [backend.open(), backend.open()]
    allowed: list[float] = []
    start = threading.Barrier(10)

    def take(thread: int) -> None:
        start.wait(timeout=30)
        for _ in range(10):
            allowed.append(handles[thread % 2].take_token("key:busy", 60))

    run_threads(take, 10)
    assert allowed.count(0) == 60 or allowed.count(0) == 61  # a second may pass in between: one more
    assert all(0 < wait <= 1 for wait in allowed if wait)


# -- server secrets ----------------------------------------------------------------------------------


def test_shared_secret_is_made_once(backend):
    first, second = backend.open(), backend.open()
    made = first.shared_secret("auth-secret")
    assert len(made) == 64 and int(made, 16) >= 0  # secrets.token_hex(32)
    assert second.shared_secret("auth-secret") == made
    assert first.shared_secret("auth-secret", initial="x" * 64) == made  # an initial value never replaces it
    other = second.shared_secret("webhook-secret")
    assert other != made and first.shared_secret("webhook-secret") == other
    # An initial value (a secret kept elsewhere before) is what a new name starts with.
    assert second.shared_secret("seeded", initial="s" * 64) == "s" * 64
    assert first.shared_secret("seeded") == "s" * 64


def test_shared_secret_from_processes_racing(backend):
    """Two processes started together ask for new secrets, round after round: one value each round."""
    rounds = [f"race-{n}" for n in range(5)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    racers = [context.Process(target=race_for_secrets,
                              args=(backend.name, backend.where, backend.prefix, rounds, barrier, results))
              for _ in range(2)]
    backend.open()  # the schema exists before the racers start (and the Redis keys get cleaned up)
    for racer in racers:
        racer.start()
    try:
        answers = [results.get(timeout=60) for _ in range(2 * len(rounds))]
    finally:
        for racer in racers:
            racer.join(timeout=30)
    assert [racer.exitcode for racer in racers] == [0, 0]
    by_name: dict[str, set[str]] = {}
    for name, value in answers:
        by_name.setdefault(name, set()).add(value)
    assert sorted(by_name) == rounds
    assert all(len(values) == 1 for values in by_name.values()), by_name
    assert len({next(iter(values)) for values in by_name.values()}) == len(rounds)
    here = backend.open()
    assert all(here.shared_secret(name) == next(iter(values)) for name, values in by_name.items())
