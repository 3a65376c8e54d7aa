"""Accounts and API keys for tests, made with the same code as `fluxserve keys create`.

The one place tests reach into the accounts layer to set up keys (and to read a store's ledger), so
that when package internals move, only this file changes. It opens the accounts exactly as the
`fluxserve keys` commands do (`fluxserve.keys_cli.open_access`: the server's settings, the same
store). Tests of the `fluxserve keys` CLI itself call the CLI instead. It also opens account stores
on each backend for the conformance suite, in this process or in a child process racing another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxserve.accounts import AccountStore
from fluxserve.accounts.money import to_micros

ACCOUNT_BACKENDS = ["sqlite", "redis", "postgres"]


@dataclass(frozen=True)
class NewKey:
    key: str  # the API key in clear, as `keys create` shows it once
    account_id: str
    webhook_secret: str  # the account's Standard Webhooks signing secret

    @property
    def key_id(self) -> str:
        return self.key.split("_")[1]


@contextmanager
def accounts_of(data_dir: Path) -> Iterator:
    """The account store of the server whose data dir this is."""
    from fluxserve.keys_cli import open_access

    with open_access(data_dir) as access:
        yield access.store


def create_key(data_dir: Path, name: str, *, credits: float = 10, rate: float = 0, in_flight: int = 0,
               models: tuple[str, ...] | None = None, webhook_url: str | None = None) -> NewKey:
    """A new account `name` with one API key. Unlike the CLI's defaults, the account has no rate
    limit and no limit of jobs in flight unless asked (0 = unlimited)."""
    from fluxserve.keys_cli import open_access  # imported here: child processes open stores without the CLI

    with open_access(data_dir) as access:
        account = access.store.create_account(name, credits=to_micros(credits), rate_per_minute=rate,
                                              max_in_flight=in_flight, models=models)
        if webhook_url:
            account = access.store.set_webhook_url(account.id, webhook_url)
        key = access.keyring.issue(account.id)[1]
    return NewKey(key=key, account_id=account.id, webhook_secret=account.webhook_secret)


def revoke_key(data_dir: Path, key: str) -> None:
    with accounts_of(data_dir) as store:
        assert store.revoke_key(key.split("_")[1])


def open_account_store(backend: str, where: str, prefix: str = "fluxserve") -> AccountStore:
    """A new handle on an account store: `where` is the SQLite file, or the Redis / PostgreSQL URL."""
    if backend == "sqlite":
        from fluxserve.accounts.sqlite import SqliteAccountStore

        return SqliteAccountStore(where)
    if backend == "redis":
        from fluxserve.accounts.redis import RedisAccountStore

        return RedisAccountStore.from_url(where, prefix=prefix)
    from fluxserve.accounts.postgres import PostgresAccountStore

    return PostgresAccountStore.from_url(where)


def race_for_secrets(backend: str, where: str, prefix: str, names: list[str], barrier: Any, results: Any) -> None:
    """A child process: open a handle, then for each name wait until the other racer is ready too and
    ask the store for the shared secret of that name; put (name, value) on `results`."""
    store = open_account_store(backend, where, prefix)
    try:
        for name in names:
            barrier.wait(timeout=60)
            results.put((name, store.shared_secret(name)))
    finally:
        store.close()


def assert_ledger_consistent(store: AccountStore, account_id: str) -> None:
    """Replaying the ledger gives the account's balance and reserved amount, row by row."""
    balance = reserved = 0
    for entry in store.ledger(account_id):
        balance += entry.amount
        reserved += entry.reserved_change
        assert (entry.balance_after, entry.reserved_after) == (balance, reserved), entry
        assert entry.balance_after >= 0 and 0 <= entry.reserved_after <= entry.balance_after, entry
    account = store.get_account(account_id)
    assert account is not None
    assert (account.balance, account.reserved) == (balance, reserved)
    assert reserved == sum(r.amount for r in store.open_reservations() if r.account_id == account_id)
