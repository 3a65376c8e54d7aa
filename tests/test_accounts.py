"""The accounts layer around the store: billing settles every job once (sweeps, retries), keys exist only
as digests under the deployment's server secret (made once in the account store, or taken over from the
file an older server kept it in), the operator's webhook secret likewise, and the auth mode decides who
may start open. What every account store promises is tests/test_account_store_conformance.py."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fluxserve.accounts.keys import KeyRejected, Keyring
from fluxserve.accounts.money import price, to_credits, to_micros
from fluxserve.accounts.sqlite import SqliteAccountStore
from fluxserve.app.access import Access, is_loopback
from fluxserve.app.billing import Billing
from fluxserve.app.webhook_owners import OwnerWebhooks
from fluxserve.config import AccountSettings, Settings, WebhookSettings
from fluxserve.contract import GenerateRequest
from fluxserve.jobs import Job, JobResult, new_job_id
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.webhooks.signing import new_secret, secret_bytes

from support.accounts import assert_ledger_consistent, create_key, open_account_store
from support.stores import drop_prefix

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
    jobs = SqliteJobStore(tmp_path / "jobs.sqlite3", LeasePolicy(lease_seconds=0.05, reclaim_backoff_seconds=0.0))
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
    # The secret lives in the account store, made once: the next process reads the same one.
    assert not (tmp_path / "auth-secret").exists()
    with open_access(tmp_path) as again, pytest.raises(KeyRejected, match="revoked"):  # found, not "Invalid"
        again.keyring.authenticate(key)
    # A configured secret wins over the store's, and another secret makes every key invalid.
    with open_access(tmp_path, auth_secret="x" * 40) as other, pytest.raises(KeyRejected):
        other.keyring.authenticate(key)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite3*"))
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw


def test_keys_made_under_the_old_secret_file_stay_valid(tmp_path):
    """A data dir from before the store kept the secret: its `auth-secret` file seeds the store."""
    old_secret = secrets.token_hex(32)
    (tmp_path / "auth-secret").write_text(old_secret + "\n")
    (tmp_path / "auth-secret").chmod(0o644)
    with SqliteAccountStore(tmp_path / "jobs.sqlite3") as store:  # the old server issued this key
        _, key = Keyring(store, lambda: old_secret.encode()).issue(new_account(store).id)
    with open_access(tmp_path) as access:
        assert access.keyring.authenticate(key)[0].name == "alice"
        assert access.store.shared_secret("auth-secret") == old_secret
    assert (tmp_path / "auth-secret").stat().st_mode & 0o077 == 0  # and the file is tightened
    (tmp_path / "auth-secret").unlink()  # once in the store, the file is no longer needed
    with open_access(tmp_path) as access:
        assert access.keyring.authenticate(key)[0].name == "alice"


def test_an_unusable_old_secret_file_is_refused(tmp_path):
    (tmp_path / "auth-secret").write_text("short\n")
    with pytest.raises(RuntimeError, match="no usable secret"), open_access(tmp_path):
        pass


@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_hosts_sharing_a_store_share_the_secrets(request, tmp_path, backend):
    """Two hosts (their own data dirs) on one Redis or PostgreSQL: a key made through one is valid on
    the other, a media link signed by one verifies on the other, and both sign operator webhooks alike."""
    where = request.getfixturevalue(f"{backend}_url")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    stores = [open_account_store(backend, where, prefix) for _ in range(2)]
    try:
        hosts = [Access(AccountSettings(), store, host="127.0.0.1", data_dir=tmp_path / f"host-{n}")
                 for n, store in enumerate(stores)]
        _, key = hosts[0].keyring.issue(new_account(stores[0]).id)
        assert hosts[1].keyring.authenticate(key)[0].name == "alice"
        assert hosts[1].keyring.verify("media:x", hosts[0].keyring.sign("media:x"))
        webhooks = [OwnerWebhooks(WebhookSettings(), store, tmp_path / f"host-{n}") for n, store in enumerate(stores)]
        assert webhooks[0].secret(None) == webhooks[1].secret(None)
        secret_bytes(webhooks[0].secret(None))
        assert not list(tmp_path.glob("host-*/*-secret"))  # nothing kept per host
    finally:
        if backend == "redis":
            drop_prefix(stores[0].client, prefix)  # type: ignore[attr-defined]
        for store in stores:
            store.close()


def test_the_operators_webhook_secret(tmp_path):
    """Unset: one Standard Webhooks secret for the deployment, made once in the account store (an old
    data dir's `webhook-secret` file seeds it); configured: that one."""
    path = tmp_path / "jobs.sqlite3"
    with SqliteAccountStore(path) as first, SqliteAccountStore(path) as second:
        made = OwnerWebhooks(WebhookSettings(), first, tmp_path).secret(None)
        secret_bytes(made)
        assert OwnerWebhooks(WebhookSettings(), second, tmp_path).secret(None) == made
        assert not (tmp_path / "webhook-secret").exists()
        configured = new_secret()
        assert OwnerWebhooks(WebhookSettings(secret=configured), first, tmp_path).secret(None) == configured
        # An account's own secret signs its jobs; an unknown owner falls back to the operator's.
        alice = new_account(first)
        assert OwnerWebhooks(WebhookSettings(), first, tmp_path).secret(alice.id) == alice.webhook_secret
        assert OwnerWebhooks(WebhookSettings(), first, tmp_path).secret("gone") == made

    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old_secret = new_secret()
    (old_dir / "webhook-secret").write_text(old_secret + "\n")
    with SqliteAccountStore(old_dir / "jobs.sqlite3") as store:
        assert OwnerWebhooks(WebhookSettings(), store, old_dir).secret(None) == old_secret
        assert store.shared_secret("webhook-secret") == old_secret


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
