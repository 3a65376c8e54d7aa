"""AccountStore on PostgreSQL: accounts, keys and credits shared by every replica of a fleet.

Each money move is one transaction that locks the account's row (`SELECT ... FOR UPDATE`, or the
conditional UPDATE that moves the money), checks, moves and appends its ledger row, so concurrent
submits on any host cannot overspend and a reservation settles once. The schema backs the rules up:
CHECK constraints keep every balance at zero or more and the reserved amount within it, and a trigger
refuses UPDATE, DELETE and TRUNCATE on the ledger. (A trigger does not stop the tables' owner, who can
disable it: let the server connect as a role that has DML rights only.) Every time is the database's
clock (`clock_timestamp()`), so replicas with drifting clocks agree on rate limits.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
from psycopg import Connection
from psycopg_pool import ConnectionPool

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
from fluxserve.pgdb import migrate, open_pool
from fluxserve.webhooks.signing import new_secret

COMPONENT = "accounts"
# Step n is schema version n (see fluxserve.pgdb.migrate): append, never edit.
SCHEMA: tuple[str, ...] = (
    """CREATE TABLE accounts (
           id              text PRIMARY KEY,
           name            text NOT NULL UNIQUE,
           balance         bigint NOT NULL CHECK (balance >= 0),
           reserved        bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= balance),
           rate_per_minute double precision NOT NULL DEFAULT 0 CHECK (rate_per_minute >= 0),
           max_in_flight   integer NOT NULL DEFAULT 0 CHECK (max_in_flight >= 0),
           models          jsonb,
           created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
           webhook_url     text,
           webhook_secret  text)""",
    """CREATE TABLE api_keys (
           id         text PRIMARY KEY,
           account_id text NOT NULL REFERENCES accounts (id),
           digest     text NOT NULL,
           created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
           revoked_at timestamptz)""",
    """CREATE TABLE reservations (
           job_id     text PRIMARY KEY,
           account_id text NOT NULL REFERENCES accounts (id),
           key_id     text NOT NULL,
           amount     bigint NOT NULL CHECK (amount >= 0),
           state      text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'charged', 'released')),
           created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
           settled_at timestamptz)""",
    "CREATE INDEX reservations_open_by_key ON reservations (key_id) WHERE state = 'open'",
    "CREATE INDEX reservations_open_by_age ON reservations (created_at) WHERE state = 'open'",
    """CREATE TABLE ledger (
           seq             bigserial PRIMARY KEY,
           at              timestamptz NOT NULL DEFAULT clock_timestamp(),
           account_id      text NOT NULL REFERENCES accounts (id),
           kind            text NOT NULL CHECK (kind IN ('credit', 'reserve', 'charge', 'release')),
           amount          bigint NOT NULL,
           reserved_change bigint NOT NULL,
           balance_after   bigint NOT NULL,
           reserved_after  bigint NOT NULL,
           job_id          text,
           note            text)""",
    "CREATE INDEX ledger_by_account ON ledger (account_id, seq)",
    """CREATE FUNCTION accounts_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'the ledger is append-only (% refused)', TG_OP; END $$""",
    """CREATE TRIGGER ledger_no_change BEFORE UPDATE OR DELETE ON ledger
       FOR EACH ROW EXECUTE FUNCTION accounts_ledger_append_only()""",
    """CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
       FOR EACH STATEMENT EXECUTE FUNCTION accounts_ledger_append_only()""",
    """CREATE TABLE rate_limits (
           bucket text PRIMARY KEY,
           tat    double precision NOT NULL)""",
    """CREATE TABLE shared_secrets (
           name       text PRIMARY KEY,
           value      text NOT NULL,
           created_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
)


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8 AS {column}"


_ACCOUNT = ("id, name, balance, reserved, rate_per_minute, max_in_flight, models, "
            f"{_epoch('created_at')}, webhook_url, webhook_secret")
_KEY = f"id, account_id, digest, {_epoch('created_at')}, {_epoch('revoked_at')}"
_RESERVATION = f"job_id, account_id, key_id, amount, state, {_epoch('created_at')}, {_epoch('settled_at')}"
_LEDGER = (f"seq, {_epoch('at')}, account_id, kind, amount, reserved_change, balance_after, reserved_after, "
           "job_id, note")
_SETTABLE = ("webhook_url", "webhook_secret")


class PostgresAccountStore:
    def __init__(self, pool: ConnectionPool, *, owns_pool: bool = False) -> None:
        self.pool = pool
        self._owns_pool = owns_pool
        migrate(pool, COMPONENT, SCHEMA)

    @classmethod
    def from_url(cls, url: str) -> PostgresAccountStore:
        pool = open_pool(url, name="fluxserve-accounts")
        try:
            return cls(pool, owns_pool=True)
        except BaseException:
            pool.close()
            raise

    def _one(self, query: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.execute(query, params).fetchone()  # type: ignore[return-value]

    def _all(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[return-value]

    # -- accounts and keys ---------------------------------------------------------------------

    def create_account(
        self, name: str, *, credits: int, rate_per_minute: float, max_in_flight: int,
        models: tuple[str, ...] | None,
    ) -> Account:
        if credits < 0 or rate_per_minute < 0 or max_in_flight < 0:
            raise ValueError("credits and limits must not be negative")
        account_id = uuid.uuid4().hex
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute(
                    """INSERT INTO accounts (id, name, balance, rate_per_minute, max_in_flight, models, webhook_secret)
                       VALUES (%s, %s, 0, %s, %s, %s::jsonb, %s)""",
                    (account_id, name, float(rate_per_minute), int(max_in_flight),
                     None if models is None else json.dumps(list(models)), new_secret()),
                )
                _move(conn, account_id, "credit", amount=credits, reserved_change=0, note="opening balance")
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"an account named {name!r} already exists") from None
        return self._account(account_id)

    def _account(self, account_id: str) -> Account:
        account = self.get_account(account_id)
        if account is None:
            raise KeyError(f"no account {account_id}")
        return account

    def get_account(self, account_id: str) -> Account | None:
        row = self._one(f"SELECT {_ACCOUNT} FROM accounts WHERE id = %s", (account_id,))
        return _account(row) if row else None

    def find_account(self, name: str) -> Account | None:
        row = self._one(f"SELECT {_ACCOUNT} FROM accounts WHERE name = %s", (name,))
        return _account(row) if row else None

    def list_accounts(self) -> list[Account]:
        return [_account(row) for row in self._all(f"SELECT {_ACCOUNT} FROM accounts ORDER BY created_at, id")]

    def top_up(self, account_id: str, credits: int, note: str | None = None) -> Account:
        if credits <= 0:
            raise ValueError("a top-up adds a positive amount of credits")
        with self.pool.connection() as conn, conn.transaction():
            _move(conn, account_id, "credit", amount=credits, reserved_change=0, note=note or "top-up")
        return self._account(account_id)

    def add_key(self, key_id: str, account_id: str, digest: str) -> ApiKey:
        try:
            row = self._one(
                f"INSERT INTO api_keys (id, account_id, digest) VALUES (%s, %s, %s) RETURNING {_KEY}",
                (key_id, account_id, digest),
            )
        except psycopg.errors.ForeignKeyViolation:
            raise KeyError(f"no account {account_id}") from None
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"a key {key_id!r} already exists") from None
        assert row is not None
        return ApiKey(**row)

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self._one(f"SELECT {_KEY} FROM api_keys WHERE id = %s", (key_id,))
        return ApiKey(**row) if row else None

    def list_keys(self) -> list[ApiKey]:
        return [ApiKey(**row) for row in self._all(f"SELECT {_KEY} FROM api_keys ORDER BY created_at, id")]

    def revoke_key(self, key_id: str) -> bool:
        with self.pool.connection() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = clock_timestamp() WHERE id = %s AND revoked_at IS NULL", (key_id,)
            )
            return cursor.rowcount == 1

    def has_keys(self) -> bool:
        row = self._one("SELECT EXISTS (SELECT 1 FROM api_keys) AS any", ())
        return bool(row and row["any"])

    def set_webhook_url(self, account_id: str, url: str | None) -> Account:
        return self._update_account(account_id, "webhook_url", url)

    def rotate_webhook_secret(self, account_id: str) -> Account:
        return self._update_account(account_id, "webhook_secret", new_secret())

    def _update_account(self, account_id: str, column: str, value: str | None) -> Account:
        assert column in _SETTABLE
        row = self._one(f"UPDATE accounts SET {column} = %s WHERE id = %s RETURNING {_ACCOUNT}", (value, account_id))
        if row is None:
            raise KeyError(f"no account {account_id}")
        return _account(row)

    # -- money ---------------------------------------------------------------------------------

    def reserve(self, job_id: str, account_id: str, key_id: str, amount: int) -> Reservation:
        if amount < 0:
            raise ValueError("a reservation holds a non-negative amount")
        try:
            return self._reserve(job_id, account_id, key_id, amount)
        except psycopg.errors.UniqueViolation:
            # The same job reserved at the same moment on another account's lock: the first one stands.
            existing = self.get_reservation(job_id)
            if existing is None:
                raise
            return existing

    def _reserve(self, job_id: str, account_id: str, key_id: str, amount: int) -> Reservation:
        with self.pool.connection() as conn, conn.transaction():
            # The account's row lock serialises the checks and the move against every other reservation
            # on it; the job's reservation is read after the lock, so a racing twin's is seen.
            account = conn.execute(
                "SELECT balance, reserved, max_in_flight FROM accounts WHERE id = %s FOR UPDATE", (account_id,)
            ).fetchone()
            existing = conn.execute(f"SELECT {_RESERVATION} FROM reservations WHERE job_id = %s", (job_id,)).fetchone()
            if existing:
                return Reservation(**existing)  # type: ignore[arg-type]
            if account is None:
                raise KeyError(f"no account {account_id}")
            limit = account["max_in_flight"]  # type: ignore[call-overload]
            if limit and self._count_in_flight(conn, key_id) >= limit:
                raise TooManyInFlight(limit)
            available = account["balance"] - account["reserved"]  # type: ignore[call-overload]
            if available < amount:
                raise NotEnoughCredits(amount, available)
            _move(conn, account_id, "reserve", amount=0, reserved_change=amount, job_id=job_id)
            row = conn.execute(
                f"""INSERT INTO reservations (job_id, account_id, key_id, amount) VALUES (%s, %s, %s, %s)
                    RETURNING {_RESERVATION}""",
                (job_id, account_id, key_id, amount),
            ).fetchone()
        return Reservation(**row)  # type: ignore[arg-type]

    def settle(self, job_id: str, *, charge: bool) -> bool:
        with self.pool.connection() as conn, conn.transaction():
            # The conditional update is the once-only guard: only one caller flips 'open' (others wait
            # for its row lock, then find the state changed).
            row = conn.execute(
                """UPDATE reservations SET state = %s, settled_at = clock_timestamp()
                   WHERE job_id = %s AND state = 'open' RETURNING account_id, amount""",
                ("charged" if charge else "released", job_id),
            ).fetchone()
            if row is None:
                return False
            amount = row["amount"]  # type: ignore[call-overload]
            _move(conn, row["account_id"], "charge" if charge else "release",  # type: ignore[call-overload]
                  amount=-amount if charge else 0, reserved_change=-amount, job_id=job_id)
        return True

    def get_reservation(self, job_id: str) -> Reservation | None:
        row = self._one(f"SELECT {_RESERVATION} FROM reservations WHERE job_id = %s", (job_id,))
        return Reservation(**row) if row else None

    def in_flight(self, key_id: str) -> int:
        with self.pool.connection() as conn:
            return self._count_in_flight(conn, key_id)

    @staticmethod
    def _count_in_flight(conn: Connection, key_id: str) -> int:
        row = conn.execute(
            "SELECT count(*) AS n FROM reservations WHERE state = 'open' AND key_id = %s", (key_id,)
        ).fetchone()
        return int(row["n"]) if row else 0  # type: ignore[call-overload]

    def open_reservations(self) -> list[Reservation]:
        rows = self._all(f"SELECT {_RESERVATION} FROM reservations WHERE state = 'open' ORDER BY created_at, job_id")
        return [Reservation(**row) for row in rows]

    def ledger(self, account_id: str | None = None) -> list[LedgerEntry]:
        if account_id is None:
            rows = self._all(f"SELECT {_LEDGER} FROM ledger ORDER BY seq")
        else:
            rows = self._all(f"SELECT {_LEDGER} FROM ledger WHERE account_id = %s ORDER BY seq", (account_id,))
        return [LedgerEntry(**row) for row in rows]

    # -- rate limits and secrets ---------------------------------------------------------------

    def take_token(self, bucket: str, rate_per_minute: float) -> float:
        if rate_per_minute <= 0:  # 0 = unlimited
            return 0.0
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("INSERT INTO rate_limits (bucket, tat) VALUES (%s, 0) ON CONFLICT (bucket) DO NOTHING",
                         (bucket,))
            row = conn.execute("SELECT tat FROM rate_limits WHERE bucket = %s FOR UPDATE", (bucket,)).fetchone()
            # The clock is read once the row is ours: a wait for the lock does not age `now`.
            clock = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS now").fetchone()
            tat, retry_after = gcra(row["tat"], clock["now"], rate_per_minute)  # type: ignore[call-overload, index]
            if retry_after == 0:
                conn.execute("UPDATE rate_limits SET tat = %s WHERE bucket = %s", (tat, bucket))
        return retry_after

    def shared_secret(self, name: str, *, initial: str | None = None) -> str:
        with self.pool.connection() as conn:
            conn.execute("INSERT INTO shared_secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                         (name, initial or new_shared_secret()))
            row = conn.execute("SELECT value FROM shared_secrets WHERE name = %s", (name,)).fetchone()
        assert row is not None
        return str(row["value"])  # type: ignore[call-overload]

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> PostgresAccountStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _move(
    conn: Connection, account_id: str, kind: str, *, amount: int, reserved_change: int,
    job_id: str | None = None, note: str | None = None,
) -> None:
    """Change an account's balance and reserved amount and append the ledger row, in the caller's
    transaction, as one statement: the UPDATE locks the row, and the CHECKs refuse a bad result."""
    row = conn.execute(
        """WITH moved AS (
               UPDATE accounts SET balance = balance + %(amount)s, reserved = reserved + %(reserved)s
               WHERE id = %(account)s RETURNING id, balance, reserved)
           INSERT INTO ledger (account_id, kind, amount, reserved_change, balance_after, reserved_after, job_id, note)
           SELECT id, %(kind)s::text, %(amount)s, %(reserved)s, balance, reserved, %(job)s::text, %(note)s::text
           FROM moved RETURNING seq""",
        {"account": account_id, "kind": kind, "amount": int(amount), "reserved": int(reserved_change),
         "job": job_id, "note": note},
    ).fetchone()
    if row is None:
        raise KeyError(f"no account {account_id}")


def _account(row: dict[str, Any]) -> Account:
    models = row["models"]
    return Account(**{**row, "models": tuple(models) if models is not None else None})
