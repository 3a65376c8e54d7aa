"""Accounts: who may call the API, what they may spend, and how fast.

An account has a name, a credit balance, limits and an allowed set of models; API keys belong to an
account. Money moves in three steps, each an append-only ledger row:

    reserve (at submit: the job's price is held; 406 when the available credits cannot cover it)
    charge  (the job COMPLETED: the held amount leaves the balance)
    release (the job FAILED: the held amount is available again)

A reservation is keyed by job id and settles exactly once, whoever asks and however often, so
worker retries and a crash between completion and settlement neither lose nor double money.
Everything lives behind `AccountStore`, so it can share whatever store the deployment uses: SQLite
(`accounts.sqlite`), Redis (`accounts.redis`) or PostgreSQL (`accounts.postgres`). The same store
keeps the deployment's server secrets (`shared_secret`), so every replica hashes keys alike.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Protocol


def new_shared_secret() -> str:
    """A fresh deployment-wide secret (see `AccountStore.shared_secret`)."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    balance: int  # micro-credits the account owns
    reserved: int  # micro-credits held for jobs in flight
    rate_per_minute: float  # generation requests per minute per key; 0 = unlimited
    max_in_flight: int  # jobs in flight per key; 0 = unlimited
    models: tuple[str, ...] | None  # allowed slugs; None = all
    created_at: float
    # Webhooks for the account's requests: the default URL (None: only where a request names one) and
    # the Standard Webhooks secret that signs them (kept out of repr, so it never reaches a log).
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    def allows(self, slug: str) -> bool:
        return self.models is None or slug in self.models


@dataclass(frozen=True)
class ApiKey:
    id: str  # public part of the key, safe to show and log
    account_id: str
    digest: str  # HMAC of the whole key; the key itself is never stored
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class Reservation:
    job_id: str
    account_id: str
    key_id: str
    amount: int
    state: str  # open | charged | released
    created_at: float
    settled_at: float | None = None


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    at: float
    account_id: str
    kind: str  # credit | reserve | charge | release
    amount: int  # change of balance
    reserved_change: int  # change of the reserved amount
    balance_after: int
    reserved_after: int
    job_id: str | None
    note: str | None


class NotEnoughCredits(Exception):
    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"needs {needed}, available {available}")
        self.needed = needed
        self.available = available


class TooManyInFlight(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"limit {limit}")
        self.limit = limit


class AccountStore(Protocol):
    def create_account(
        self, name: str, *, credits: int, rate_per_minute: float, max_in_flight: int,
        models: tuple[str, ...] | None,
    ) -> Account:
        """A new account with its own webhook secret; its opening balance is a `credit` ledger row.
        ValueError if the name is taken."""

    def get_account(self, account_id: str) -> Account | None: ...

    def find_account(self, name: str) -> Account | None: ...

    def list_accounts(self) -> list[Account]: ...

    def top_up(self, account_id: str, credits: int, note: str | None = None) -> Account:
        """Add credits (a `credit` ledger row)."""

    def add_key(self, key_id: str, account_id: str, digest: str) -> ApiKey: ...

    def get_key(self, key_id: str) -> ApiKey | None: ...

    def list_keys(self) -> list[ApiKey]: ...

    def revoke_key(self, key_id: str) -> bool:
        """True when the key was active and is now revoked."""

    def has_keys(self) -> bool:
        """True once any key was ever created (revoked ones count)."""

    def set_webhook_url(self, account_id: str, url: str | None) -> Account:
        """Set (or, with None, clear) the account's default webhook URL."""

    def rotate_webhook_secret(self, account_id: str) -> Account:
        """Replace the account's webhook signing secret with a new one."""

    def reserve(self, job_id: str, account_id: str, key_id: str, amount: int) -> Reservation:
        """Hold `amount` for the job, atomically with the checks: TooManyInFlight when the key has its
        limit of open reservations, NotEnoughCredits when the available credits fall short. A second
        call for the same job returns the first reservation and holds nothing more."""

    def settle(self, job_id: str, *, charge: bool) -> bool:
        """Charge (COMPLETED) or release (FAILED) the job's open reservation; True only for the one
        call that settled it, False when there is none or it was already settled."""

    def get_reservation(self, job_id: str) -> Reservation | None: ...

    def in_flight(self, key_id: str) -> int:
        """How many of the key's reservations are open (its jobs in flight)."""

    def open_reservations(self) -> list[Reservation]: ...

    def ledger(self, account_id: str | None = None) -> list[LedgerEntry]: ...

    def take_token(self, bucket: str, rate_per_minute: float) -> float:
        """Rate limiting (GCRA) on shared state: 0 when allowed (and counted), else seconds to wait."""

    def shared_secret(self, name: str, *, initial: str | None = None) -> str:
        """The deployment-wide secret called `name`, created once atomically by whichever process asks
        first (`secrets.token_hex(32)`, or `initial` when given: a secret kept elsewhere before); every
        later call anywhere returns the same value."""

    def close(self) -> None: ...


def existing_account(store: AccountStore, account_id: str) -> Account:
    """The account a store call just wrote or named; KeyError when there is none."""
    account = store.get_account(account_id)
    if account is None:
        raise KeyError(f"no account {account_id}")
    return account
