"""AccountStore on SQLite: its own tables in the same file as the jobs.

Each money movement is one `BEGIN IMMEDIATE` transaction that checks, moves and writes its ledger
row together, so concurrent submits (threads or processes on the file) cannot overspend. The
schema backs the rules up: balances cannot go negative, more cannot be reserved than is owned, and
the ledger refuses UPDATE and DELETE. The server secrets live in the same file (`shared_secrets`).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

from fluxserve.accounts import (
    Account,
    ApiKey,
    LedgerEntry,
    NotEnoughCredits,
    Reservation,
    TooManyInFlight,
    new_shared_secret,
)
from fluxserve.accounts.ratelimit import gcra
from fluxserve.dbfile import SqliteFile
from fluxserve.webhooks.signing import new_secret

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    balance         INTEGER NOT NULL CHECK (balance >= 0),
    reserved        INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= balance),
    rate_per_minute REAL NOT NULL DEFAULT 0,
    max_in_flight   INTEGER NOT NULL DEFAULT 0,
    models          TEXT,
    created_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    digest     TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS reservations (
    job_id     TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_id     TEXT NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    state      TEXT NOT NULL DEFAULT 'open',
    created_at REAL NOT NULL,
    settled_at REAL
);
CREATE INDEX IF NOT EXISTS reservations_by_state ON reservations (state, key_id);
CREATE TABLE IF NOT EXISTS ledger (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    at              REAL NOT NULL,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    kind            TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    reserved_change INTEGER NOT NULL,
    balance_after   INTEGER NOT NULL,
    reserved_after  INTEGER NOT NULL,
    job_id          TEXT,
    note            TEXT
);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS rate_limits (
    bucket TEXT PRIMARY KEY,
    tat    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shared_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
# Account columns added after the first release; databases made before them gain them on open.
_ACCOUNT_COLUMNS = {"webhook_url": "TEXT", "webhook_secret": "TEXT"}


class SqliteAccountStore:
    def __init__(self, path: Path | str) -> None:
        self.file = SqliteFile(path)
        self.file.db().executescript(_SCHEMA)
        self._migrate_webhook_columns()

    def _migrate_webhook_columns(self) -> None:
        """Add the webhook columns if missing, and give every account without a secret its own."""
        with self.file.transaction() as db:
            present = {row["name"] for row in db.execute("PRAGMA table_info(accounts)")}
            for name, kind in _ACCOUNT_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE accounts ADD COLUMN {name} {kind}")
            for (account_id,) in db.execute("SELECT id FROM accounts WHERE webhook_secret IS NULL").fetchall():
                db.execute("UPDATE accounts SET webhook_secret = ? WHERE id = ?", (new_secret(), account_id))

    # -- accounts and keys ---------------------------------------------------------------------

    def create_account(
        self, name: str, *, credits: int, rate_per_minute: float, max_in_flight: int,
        models: tuple[str, ...] | None,
    ) -> Account:
        if credits < 0 or rate_per_minute < 0 or max_in_flight < 0:
            raise ValueError("credits and limits must not be negative")
        account_id = uuid.uuid4().hex
        try:
            with self.file.transaction() as db:
                db.execute(
                    """INSERT INTO accounts (id, name, balance, rate_per_minute, max_in_flight, models, created_at,
                                            webhook_secret)
                       VALUES (?, ?, 0, ?, ?, ?, ?, ?)""",
                    (account_id, name, rate_per_minute, max_in_flight,
                     None if models is None else json.dumps(list(models)), time.time(), new_secret()),
                )
                _move(db, account_id, "credit", amount=credits, reserved_change=0, note="opening balance")
        except sqlite3.IntegrityError:
            raise ValueError(f"an account named {name!r} already exists") from None
        return self._account(account_id)

    def _account(self, account_id: str) -> Account:
        """An account this store just wrote (it exists)."""
        account = self.get_account(account_id)
        assert account is not None
        return account

    def get_account(self, account_id: str) -> Account | None:
        row = self.file.db().execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return _account(row) if row else None

    def find_account(self, name: str) -> Account | None:
        row = self.file.db().execute("SELECT * FROM accounts WHERE name = ?", (name,)).fetchone()
        return _account(row) if row else None

    def list_accounts(self) -> list[Account]:
        return [_account(row) for row in self.file.db().execute("SELECT * FROM accounts ORDER BY created_at")]

    def top_up(self, account_id: str, credits: int, note: str | None = None) -> Account:
        if credits <= 0:
            raise ValueError("a top-up adds a positive amount of credits")
        with self.file.transaction() as db:
            _move(db, account_id, "credit", amount=credits, reserved_change=0, note=note or "top-up")
        return self._account(account_id)

    def add_key(self, key_id: str, account_id: str, digest: str) -> ApiKey:
        key = ApiKey(key_id, account_id, digest, time.time())
        with self.file.transaction() as db:
            if db.execute("SELECT 1 FROM accounts WHERE id = ?", (account_id,)).fetchone() is None:
                raise KeyError(f"no account {account_id}")
            try:
                db.execute(
                    "INSERT INTO api_keys (id, account_id, digest, created_at) VALUES (?, ?, ?, ?)",
                    (key.id, key.account_id, key.digest, key.created_at),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a key {key_id!r} already exists") from None
        return key

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self.file.db().execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    def list_keys(self) -> list[ApiKey]:
        return [_key(row) for row in self.file.db().execute("SELECT * FROM api_keys ORDER BY created_at")]

    def revoke_key(self, key_id: str) -> bool:
        with self.file.transaction() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
        return cur.rowcount == 1

    def has_keys(self) -> bool:
        return self.file.db().execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def set_webhook_url(self, account_id: str, url: str | None) -> Account:
        return self._update_account(account_id, "webhook_url", url)

    def rotate_webhook_secret(self, account_id: str) -> Account:
        return self._update_account(account_id, "webhook_secret", new_secret())

    def _update_account(self, account_id: str, column: str, value: str | None) -> Account:
        with self.file.transaction() as db:
            cur = db.execute(f"UPDATE accounts SET {column} = ? WHERE id = ?", (value, account_id))
        if cur.rowcount != 1:
            raise KeyError(f"no account {account_id}")
        return self._account(account_id)

    # -- money ---------------------------------------------------------------------------------

    def reserve(self, job_id: str, account_id: str, key_id: str, amount: int) -> Reservation:
        if amount < 0:
            raise ValueError("a reservation holds a non-negative amount")
        with self.file.transaction() as db:
            existing = db.execute("SELECT * FROM reservations WHERE job_id = ?", (job_id,)).fetchone()
            if existing:
                return _reservation(existing)
            account = db.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
            if account is None:
                raise KeyError(f"no account {account_id}")
            if account["max_in_flight"] and self.in_flight(key_id) >= account["max_in_flight"]:
                raise TooManyInFlight(account["max_in_flight"])
            if account["balance"] - account["reserved"] < amount:
                raise NotEnoughCredits(amount, account["balance"] - account["reserved"])
            _move(db, account_id, "reserve", amount=0, reserved_change=amount, job_id=job_id)
            db.execute(
                """INSERT INTO reservations (job_id, account_id, key_id, amount, created_at)
                   VALUES (?, ?, ?, ?, ?)""",
                (job_id, account_id, key_id, amount, time.time()),
            )
            row = db.execute("SELECT * FROM reservations WHERE job_id = ?", (job_id,)).fetchone()
        return _reservation(row)

    def settle(self, job_id: str, *, charge: bool) -> bool:
        state = "charged" if charge else "released"
        with self.file.transaction() as db:
            # The conditional update is the once-only guard: only one caller flips 'open'.
            row = db.execute(
                """UPDATE reservations SET state = ?, settled_at = ? WHERE job_id = ? AND state = 'open'
                   RETURNING account_id, amount""",
                (state, time.time(), job_id),
            ).fetchone()
            if row is None:
                return False
            amount = row["amount"]
            _move(db, row["account_id"], "charge" if charge else "release",
                  amount=-amount if charge else 0, reserved_change=-amount, job_id=job_id)
        return True

    def get_reservation(self, job_id: str) -> Reservation | None:
        row = self.file.db().execute("SELECT * FROM reservations WHERE job_id = ?", (job_id,)).fetchone()
        return _reservation(row) if row else None

    def in_flight(self, key_id: str) -> int:
        (count,) = self.file.db().execute(
            "SELECT COUNT(*) FROM reservations WHERE state = 'open' AND key_id = ?", (key_id,)
        ).fetchone()
        return count

    def open_reservations(self) -> list[Reservation]:
        rows = self.file.db().execute("SELECT * FROM reservations WHERE state = 'open' ORDER BY created_at")
        return [_reservation(row) for row in rows]

    def ledger(self, account_id: str | None = None) -> list[LedgerEntry]:
        if account_id is None:
            rows = self.file.db().execute("SELECT * FROM ledger ORDER BY seq")
        else:
            rows = self.file.db().execute("SELECT * FROM ledger WHERE account_id = ? ORDER BY seq", (account_id,))
        return [LedgerEntry(**dict(row)) for row in rows]

    # -- rate limits ---------------------------------------------------------------------------

    def take_token(self, bucket: str, rate_per_minute: float) -> float:
        if rate_per_minute <= 0:  # 0 = unlimited
            return 0.0
        with self.file.transaction() as db:
            row = db.execute("SELECT tat FROM rate_limits WHERE bucket = ?", (bucket,)).fetchone()
            tat, retry_after = gcra(row["tat"] if row else None, time.time(), rate_per_minute)
            if retry_after == 0:
                db.execute(
                    "INSERT INTO rate_limits (bucket, tat) VALUES (?, ?) "
                    "ON CONFLICT (bucket) DO UPDATE SET tat = excluded.tat",
                    (bucket, tat),
                )
        return retry_after

    # -- server secrets ------------------------------------------------------------------------

    def shared_secret(self, name: str, *, initial: str | None = None) -> str:
        # Whoever inserts first wins; the losers' inserts are ignored, and everyone reads the winner's.
        with self.file.transaction() as db:
            db.execute("INSERT OR IGNORE INTO shared_secrets (name, value) VALUES (?, ?)",
                       (name, initial or new_shared_secret()))
        (value,) = db.execute("SELECT value FROM shared_secrets WHERE name = ?", (name,)).fetchone()
        return value

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SqliteAccountStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _move(
    db: sqlite3.Connection, account_id: str, kind: str, *, amount: int, reserved_change: int,
    job_id: str | None = None, note: str | None = None,
) -> None:
    """Change an account's balance and reserved amount and write the ledger row, in the caller's transaction."""
    row = db.execute(
        "UPDATE accounts SET balance = balance + ?, reserved = reserved + ? WHERE id = ? RETURNING balance, reserved",
        (amount, reserved_change, account_id),
    ).fetchone()
    if row is None:
        raise KeyError(f"no account {account_id}")
    db.execute(
        """INSERT INTO ledger (at, account_id, kind, amount, reserved_change, balance_after, reserved_after,
                               job_id, note)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (time.time(), account_id, kind, amount, reserved_change, row["balance"], row["reserved"], job_id, note),
    )


def _account(row: sqlite3.Row) -> Account:
    models = json.loads(row["models"]) if row["models"] is not None else None
    return Account(**{**dict(row), "models": tuple(models) if models is not None else None})


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(**dict(row))


def _reservation(row: sqlite3.Row) -> Reservation:
    return Reservation(**dict(row))
