"""Accounts and API keys for tests, made with the same code as `fluxserve keys create`.

The one place tests reach into the accounts layer to set up keys (and to read a store's ledger), so
that when package internals move, only this file changes. It opens the accounts exactly as the
`fluxserve keys` commands do (`fluxserve.keys_cli.open_access`: the server's settings, the same
store). Tests of the `fluxserve keys` CLI itself call the CLI instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fluxserve.accounts.money import to_micros
from fluxserve.keys_cli import open_access


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
    with open_access(data_dir) as access:
        yield access.store


def create_key(data_dir: Path, name: str, *, credits: float = 10, rate: float = 0, in_flight: int = 0,
               models: tuple[str, ...] | None = None, webhook_url: str | None = None) -> NewKey:
    """A new account `name` with one API key. Unlike the CLI's defaults, the account has no rate
    limit and no limit of jobs in flight unless asked (0 = unlimited)."""
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
