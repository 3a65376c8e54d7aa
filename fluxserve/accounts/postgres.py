"""AccountStore on PostgreSQL: accounts, keys and credits shared by every replica of a fleet.

Each money move is one transaction that locks the account's row (`SELECT ... FOR UPDATE`, or the
conditional UPDATE that moves the money), checks, moves and appends its ledger row, so concurrent
submits on any host cannot overspend and a reservation settles once. The schema backs the rules up:
CHECK constraints keep every balance at zero or more and the reserved amount within it, and a trigger
refuses UPDATE, DELETE and TRUNCATE on the ledger. (A trigger does not stop the tables' owner, who can
disable it: let the server connect as a role that has DML rights only.) Every time is the database's
clock (`clock_timestamp()`), so replicas with drifting clocks agree on rate limits.

A reply can be lost after the server ran a call (a reset connection, a reply held past the try's time
and cut): every call is run again (`pgdb.StoreCalls`), with the same arguments, and answers the re-run
as it answered the first run, as the Redis store's scripts do. What the call chose before it started
makes that possible: create_account its account id (a re-run that finds the account returns it),
top_up a token recorded on its ledger row (`op`: a re-run that finds its row credits nothing more),
add_key its key id and digest (the same key found again is returned), revoke_key and settle a token
recorded on the row they changed (`revoked_by`, `settled_by`: a re-run that finds its own token
answers True again), rotate_webhook_secret the new secret. A reservation is known by its job id. A
re-run of take_token may take a second token (the first's reply lost after it counted): a rate limit
errs on the strict side there, once in a while.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg_pool import ConnectionPool

from fluxserve.accounts import (
    Account,
    ApiKey,
    LedgerEntry,
    NotEnoughCredits,
    Reservation,
    TooManyInFlight,
    existing_account,
    new_shared_secret,
)
from fluxserve.accounts.ratelimit import gcra
from fluxserve.pgdb import CallTimeouts, StoreCalls, migrate, open_pool
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
    # Per-call tokens, so that a call re-run after a lost reply finds what it did the first time.
    "ALTER TABLE ledger ADD COLUMN op text",
    "CREATE UNIQUE INDEX ledger_op ON ledger (op) WHERE op IS NOT NULL",
    "ALTER TABLE api_keys ADD COLUMN revoked_by text",
    "ALTER TABLE reservations ADD COLUMN settled_by text",
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
    def __init__(self, pool: ConnectionPool, *, owns_pool: bool = False,
                 timeouts: CallTimeouts | None = None) -> None:
        self.pool = pool
        self._owns_pool = owns_pool
        self._calls = StoreCalls(pool, timeouts or CallTimeouts.for_requests())
        migrate(pool, COMPONENT, SCHEMA)

    @classmethod
    def from_url(cls, url: str) -> PostgresAccountStore:
        timeouts = CallTimeouts.for_requests()
        pool = open_pool(url, name="fluxserve-accounts", timeouts=timeouts)
        try:
            return cls(pool, owns_pool=True, timeouts=timeouts)
        except BaseException:
            pool.close()
            raise

    def _one(self, query: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        """One statement whose re-run answers as the first run did (a read, an idempotent write)."""
        return self._calls.fetch_one(query, params)

    def _all(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self._calls.fetch_all(query, params)

    # -- accounts and keys ---------------------------------------------------------------------

    def create_account(
        self, name: str, *, credits: int, rate_per_minute: float, max_in_flight: int,
        models: tuple[str, ...] | None,
    ) -> Account:
        if credits < 0 or rate_per_minute < 0 or max_in_flight < 0:
            raise ValueError("credits and limits must not be negative")
        account_id, secret = uuid.uuid4().hex, new_secret()  # chosen once: a re-run recognises its account

        def run(_retried: bool) -> None:
            try:
                with self._calls.cursor(transaction=True) as cur:
                    cur.execute(
                        """INSERT INTO accounts (id, name, balance, rate_per_minute, max_in_flight, models,
                                                 webhook_secret)
                           VALUES (%s, %s, 0, %s, %s, %s::jsonb, %s)""",
                        (account_id, name, float(rate_per_minute), int(max_in_flight),
                         None if models is None else json.dumps(list(models)), secret),
                    )
                    _move(cur, account_id, "credit", amount=credits, reserved_change=0, note="opening balance")
            except psycopg.errors.UniqueViolation:
                # The account (with its opening balance: one transaction) may be this call's own, made
                # by a run whose reply was lost.
                if self._one("SELECT id FROM accounts WHERE id = %s", (account_id,)) is None:
                    raise ValueError(f"an account named {name!r} already exists") from None

        self._calls.call(run)
        return existing_account(self, account_id)

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
        op = uuid.uuid4().hex  # recorded with the ledger row: a re-run that finds it credits nothing more

        def run(_retried: bool) -> None:
            try:
                with self._calls.cursor(transaction=True) as cur:
                    if cur.execute("SELECT 1 FROM ledger WHERE op = %s", (op,)).fetchone() is None:
                        _move(cur, account_id, "credit", amount=credits, reserved_change=0, note=note or "top-up",
                              op=op)
            except psycopg.errors.UniqueViolation as exc:
                # A first run still committing when this one looked: its row stands, this one is refused.
                if exc.diag.constraint_name != "ledger_op":
                    raise

        self._calls.call(run)
        return existing_account(self, account_id)

    def add_key(self, key_id: str, account_id: str, digest: str) -> ApiKey:
        def run(_retried: bool) -> dict[str, Any] | None:
            try:
                with self._calls.cursor() as cur:
                    return cur.execute(
                        f"INSERT INTO api_keys (id, account_id, digest) VALUES (%s, %s, %s) RETURNING {_KEY}",
                        (key_id, account_id, digest),
                    ).fetchone()
            except psycopg.errors.ForeignKeyViolation:
                raise KeyError(f"no account {account_id}") from None
            except psycopg.errors.UniqueViolation:
                # The same key (a run whose reply was lost added it) is this call's answer; another is not.
                existing = self._one(f"SELECT {_KEY} FROM api_keys WHERE id = %s", (key_id,))
                if existing is None or (existing["account_id"], existing["digest"]) != (account_id, digest):
                    raise ValueError(f"a key {key_id!r} already exists") from None
                return existing

        row = self._calls.call(run)
        assert row is not None
        return ApiKey(**row)

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self._one(f"SELECT {_KEY} FROM api_keys WHERE id = %s", (key_id,))
        return ApiKey(**row) if row else None

    def list_keys(self) -> list[ApiKey]:
        return [ApiKey(**row) for row in self._all(f"SELECT {_KEY} FROM api_keys ORDER BY created_at, id")]

    def revoke_key(self, key_id: str) -> bool:
        token = uuid.uuid4().hex  # recorded on the key: a re-run that finds it knows the key was revoked by this call

        def run(_retried: bool) -> bool:
            with self._calls.cursor() as cur:
                revoked = cur.execute(
                    """UPDATE api_keys SET revoked_at = clock_timestamp(), revoked_by = %s
                       WHERE id = %s AND revoked_at IS NULL""",
                    (token, key_id),
                ).rowcount
                if revoked:
                    return True
                # A statement of its own (a fresh snapshot): it sees a first run that committed meanwhile.
                row = cur.execute("SELECT revoked_by FROM api_keys WHERE id = %s", (key_id,)).fetchone()
                return row is not None and row["revoked_by"] == token

        return self._calls.call(run)

    def has_keys(self) -> bool:
        row = self._one("SELECT EXISTS (SELECT 1 FROM api_keys) AS any", ())
        return bool(row and row["any"])

    def set_webhook_url(self, account_id: str, url: str | None) -> Account:
        return self._update_account(account_id, "webhook_url", url)

    def rotate_webhook_secret(self, account_id: str) -> Account:
        return self._update_account(account_id, "webhook_secret", new_secret())

    def _update_account(self, account_id: str, column: str, value: str | None) -> Account:
        assert column in _SETTABLE  # `value` was chosen before the call: a re-run sets the same one
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
        # A re-run finds the reservation its first run made (by job id) and returns it.
        return self._calls.call(lambda _retried: self._reserve_once(job_id, account_id, key_id, amount))

    def _reserve_once(self, job_id: str, account_id: str, key_id: str, amount: int) -> Reservation:
        with self._calls.cursor(transaction=True) as conn:
            # The account's row lock serialises the checks and the move against every other reservation
            # on it; the job's reservation is read after the lock, so a racing twin's is seen.
            account = conn.execute(
                "SELECT balance, reserved, max_in_flight FROM accounts WHERE id = %s FOR UPDATE", (account_id,)
            ).fetchone()
            existing = conn.execute(f"SELECT {_RESERVATION} FROM reservations WHERE job_id = %s", (job_id,)).fetchone()
            if existing:
                return Reservation(**existing)
            if account is None:
                raise KeyError(f"no account {account_id}")
            limit = account["max_in_flight"]
            if limit and self._count_in_flight(conn, key_id) >= limit:
                raise TooManyInFlight(limit)
            available = account["balance"] - account["reserved"]
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
        token = uuid.uuid4().hex  # recorded on the reservation: a re-run that finds it answers True again

        def run(_retried: bool) -> bool:
            with self._calls.cursor(transaction=True) as cur:
                # The conditional update is the once-only guard: only one caller flips 'open' (others
                # wait for its row lock, then find the state changed).
                row = cur.execute(
                    """UPDATE reservations SET state = %s, settled_at = clock_timestamp(), settled_by = %s
                       WHERE job_id = %s AND state = 'open' RETURNING account_id, amount""",
                    ("charged" if charge else "released", token, job_id),
                ).fetchone()
                if row is None:
                    # Settled already: by this call's first run (its reply lost), or by another call.
                    mine = cur.execute("SELECT settled_by FROM reservations WHERE job_id = %s", (job_id,)).fetchone()
                    return mine is not None and mine["settled_by"] == token
                amount = row["amount"]
                _move(cur, row["account_id"], "charge" if charge else "release",
                      amount=-amount if charge else 0, reserved_change=-amount, job_id=job_id)
            return True

        return self._calls.call(run)

    def get_reservation(self, job_id: str) -> Reservation | None:
        row = self._one(f"SELECT {_RESERVATION} FROM reservations WHERE job_id = %s", (job_id,))
        return Reservation(**row) if row else None

    def in_flight(self, key_id: str) -> int:
        def run(_retried: bool) -> int:
            with self._calls.cursor() as cur:
                return self._count_in_flight(cur, key_id)

        return self._calls.call(run)

    @staticmethod
    def _count_in_flight(conn: Cursor[DictRow], key_id: str) -> int:
        row = conn.execute(
            "SELECT count(*) AS n FROM reservations WHERE state = 'open' AND key_id = %s", (key_id,)
        ).fetchone()
        return int(row["n"]) if row else 0

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
        # A re-run (the first run's reply lost after it counted) may take a second token: see the module.
        return self._calls.call(lambda _retried: self._take_token_once(bucket, rate_per_minute))

    def _take_token_once(self, bucket: str, rate_per_minute: float) -> float:
        with self._calls.cursor(transaction=True) as conn:
            conn.execute("INSERT INTO rate_limits (bucket, tat) VALUES (%s, 0) ON CONFLICT (bucket) DO NOTHING",
                         (bucket,))
            row = conn.execute("SELECT tat FROM rate_limits WHERE bucket = %s FOR UPDATE", (bucket,)).fetchone()
            # The clock is read once the row is ours: a wait for the lock does not age `now`.
            clock = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS now").fetchone()
            tat, retry_after = gcra(row["tat"], clock["now"], rate_per_minute)  # type: ignore[index]
            if retry_after == 0:
                conn.execute("UPDATE rate_limits SET tat = %s WHERE bucket = %s", (tat, bucket))
        return retry_after

    def shared_secret(self, name: str, *, initial: str | None = None) -> str:
        candidate = initial or new_shared_secret()

        def run(_retried: bool) -> str:
            with self._calls.cursor() as cur:
                cur.execute("INSERT INTO shared_secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                            (name, candidate))
                row = cur.execute("SELECT value FROM shared_secrets WHERE name = %s", (name,)).fetchone()
            assert row is not None
            return str(row["value"])

        return self._calls.call(run)

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> PostgresAccountStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _move(
    conn: Cursor[DictRow], account_id: str, kind: str, *, amount: int, reserved_change: int,
    job_id: str | None = None, note: str | None = None, op: str | None = None,
) -> None:
    """Change an account's balance and reserved amount and append the ledger row, in the caller's
    transaction, as one statement: the UPDATE locks the row, and the CHECKs refuse a bad result."""
    row = conn.execute(
        """WITH moved AS (
               UPDATE accounts SET balance = balance + %(amount)s, reserved = reserved + %(reserved)s
               WHERE id = %(account)s RETURNING id, balance, reserved)
           INSERT INTO ledger (account_id, kind, amount, reserved_change, balance_after, reserved_after, job_id,
                               note, op)
           SELECT id, %(kind)s::text, %(amount)s, %(reserved)s, balance, reserved, %(job)s::text, %(note)s::text,
                  %(op)s::text
           FROM moved RETURNING seq""",
        {"account": account_id, "kind": kind, "amount": int(amount), "reserved": int(reserved_change),
         "job": job_id, "note": note, "op": op},
    ).fetchone()
    if row is None:
        raise KeyError(f"no account {account_id}")


def _account(row: dict[str, Any]) -> Account:
    models = row["models"]
    return Account(**{**row, "models": tuple(models) if models is not None else None})
