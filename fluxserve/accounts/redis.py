"""AccountStore on Redis: accounts, keys and credits shared by every API replica and worker of a fleet.

Every money move (an opening balance, a top-up, a reservation with its in-flight and credit checks, a
charge or a release) is one Lua script (`redis_scripts`, which also lists the keys), so it checks,
moves and writes its ledger entry atomically on the server: concurrent submits on any host cannot
overspend, a reservation for a job is made once and settles once, and no script writes a balance
below zero or a reserved amount above the balance. The ledger is a list per account that only the
scripts append to. Rate limits (GCRA) run in Lua on the server's clock, so every replica counts
against one bucket per key.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import redis

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
from fluxserve.accounts import redis_scripts as scripts
from fluxserve.redisconn import connect
from fluxserve.webhooks.signing import new_secret

# How long one call may wait for its reply (then the client re-sends it, which each script answers as once).
ACCOUNT_CALL_TIMEOUT_S = 5.0
_SCRIPTS = ("CREATE", "TOP_UP", "ADD_KEY", "REVOKE_KEY", "SET_ACCOUNT_FIELD", "RESERVE", "SETTLE", "TAKE_TOKEN")


class RedisAccountStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "fluxserve") -> None:
        self.client = client
        self.prefix = prefix
        self._keys = f"{prefix}:accounts:"
        self._scripts = {
            name: client.register_script(scripts.PRELUDE + getattr(scripts, name)) for name in _SCRIPTS
        }

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "fluxserve") -> RedisAccountStore:
        # Every call is a short script: a reply held longer than this is a sick store (a 503), not a wait.
        return cls(connect(url, decode_responses=True, socket_timeout=ACCOUNT_CALL_TIMEOUT_S), prefix=prefix)

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](args=[self.prefix, *args])

    def _key(self, *parts: str) -> str:
        return self._keys + ":".join(parts)

    # The client decodes every answer (decode_responses), so its values are str.

    def _hash(self, *parts: str) -> dict[str, str]:
        return cast(dict[str, str], self.client.hgetall(self._key(*parts)))

    def _list(self, *parts: str) -> list[str]:
        return cast(list[str], self.client.lrange(self._key(*parts), 0, -1))

    # -- accounts and keys ---------------------------------------------------------------------

    def create_account(
        self, name: str, *, credits: int, rate_per_minute: float, max_in_flight: int,
        models: tuple[str, ...] | None,
    ) -> Account:
        if credits < 0 or rate_per_minute < 0 or max_in_flight < 0:
            raise ValueError("credits and limits must not be negative")
        account_id = uuid.uuid4().hex
        answer = self._run("CREATE", account_id, name, int(credits), repr(float(rate_per_minute)),
                           int(max_in_flight), "" if models is None else json.dumps(list(models)), new_secret())
        if answer == "taken":
            raise ValueError(f"an account named {name!r} already exists")
        return existing_account(self, account_id)

    def get_account(self, account_id: str) -> Account | None:
        record = self._hash("account", account_id)
        return _account(record) if record else None

    def find_account(self, name: str) -> Account | None:
        account_id = cast(str | None, self.client.hget(self._key("names"), name))
        return self.get_account(account_id) if account_id else None

    def list_accounts(self) -> list[Account]:
        return [_account(r) for r in self._records("account", self._list("accounts"))]

    def _records(self, kind: str, ids: list[str]) -> list[dict[str, str]]:
        """The hashes of `kind` for the ids, in their order (ones gone meanwhile left out)."""
        pipe = self.client.pipeline(transaction=False)
        for record_id in ids:
            pipe.hgetall(self._key(kind, record_id))
        return [cast(dict[str, str], record) for record in pipe.execute() if record]

    def top_up(self, account_id: str, credits: int, note: str | None = None) -> Account:
        if credits <= 0:
            raise ValueError("a top-up adds a positive amount of credits")
        if self._run("TOP_UP", account_id, int(credits), note or "top-up", uuid.uuid4().hex) == "no_account":
            raise KeyError(f"no account {account_id}")
        return existing_account(self, account_id)

    def add_key(self, key_id: str, account_id: str, digest: str) -> ApiKey:
        answer = self._run("ADD_KEY", key_id, account_id, digest)
        if answer[0] == "no_account":
            raise KeyError(f"no account {account_id}")
        if answer[0] == "taken":
            raise ValueError(f"a key {key_id!r} already exists")
        return _key(_pairs(answer[1]))

    def get_key(self, key_id: str) -> ApiKey | None:
        record = self._hash("key", key_id)
        return _key(record) if record else None

    def list_keys(self) -> list[ApiKey]:
        return [_key(r) for r in self._records("key", self._list("keys"))]

    def revoke_key(self, key_id: str) -> bool:
        return self._run("REVOKE_KEY", key_id, uuid.uuid4().hex) == 1

    def has_keys(self) -> bool:
        return bool(self.client.exists(self._key("keys")))

    def set_webhook_url(self, account_id: str, url: str | None) -> Account:
        return self._set_field(account_id, "webhook_url", url or "")

    def rotate_webhook_secret(self, account_id: str) -> Account:
        return self._set_field(account_id, "webhook_secret", new_secret())

    def _set_field(self, account_id: str, name: str, value: str) -> Account:
        if self._run("SET_ACCOUNT_FIELD", account_id, name, value) != 1:
            raise KeyError(f"no account {account_id}")
        return existing_account(self, account_id)

    # -- money ---------------------------------------------------------------------------------

    def reserve(self, job_id: str, account_id: str, key_id: str, amount: int) -> Reservation:
        if amount < 0:
            raise ValueError("a reservation holds a non-negative amount")
        answer = self._run("RESERVE", job_id, account_id, key_id, int(amount))
        outcome = answer[0]
        if outcome == "no_account":
            raise KeyError(f"no account {account_id}")
        if outcome == "in_flight":
            raise TooManyInFlight(int(answer[1]))
        if outcome == "credits":
            raise NotEnoughCredits(amount, int(answer[1]))
        return _reservation(_pairs(answer[1]))

    def settle(self, job_id: str, *, charge: bool) -> bool:
        return self._run("SETTLE", job_id, "1" if charge else "0", uuid.uuid4().hex) == 1

    def get_reservation(self, job_id: str) -> Reservation | None:
        record = self._hash("reservation", job_id)
        return _reservation(record) if record else None

    def in_flight(self, key_id: str) -> int:
        return int(self.client.scard(self._key("in_flight", key_id)))

    def open_reservations(self) -> list[Reservation]:
        job_ids = cast(list[str], self.client.zrange(self._key("open"), 0, -1))
        return [r for r in map(_reservation, self._records("reservation", job_ids)) if r.state == "open"]

    def ledger(self, account_id: str | None = None) -> list[LedgerEntry]:
        account_ids = [account_id] if account_id is not None else self._list("accounts")
        pipe = self.client.pipeline(transaction=False)
        for each in account_ids:
            pipe.lrange(self._key("ledger", each), 0, -1)
        entries = [_ledger_entry(raw) for rows in pipe.execute() for raw in rows]
        return sorted(entries, key=lambda entry: entry.seq) if account_id is None else entries

    # -- rate limits and secrets ---------------------------------------------------------------

    def take_token(self, bucket: str, rate_per_minute: float) -> float:
        if rate_per_minute <= 0:  # 0 = unlimited
            return 0.0
        return float(self._run("TAKE_TOKEN", bucket, repr(float(rate_per_minute))))

    def shared_secret(self, name: str, *, initial: str | None = None) -> str:
        key = f"{self.prefix}:secret:{name}"
        # SET NX: the first writer's value stays; a retried SET NX is harmless, and GET reads the winner.
        self.client.set(key, initial or new_shared_secret(), nx=True)
        value = self.client.get(key)
        if value is None:  # deleted by hand between the two calls: make it again
            return self.shared_secret(name, initial=initial)
        return str(value)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RedisAccountStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _optional_float(value: str | None) -> float | None:
    return float(value) if value is not None else None


def _account(record: dict[str, str]) -> Account:
    models = record.get("models")
    return Account(
        id=record["id"],
        name=record["name"],
        balance=int(record["balance"]),
        reserved=int(record["reserved"]),
        rate_per_minute=float(record["rate_per_minute"]),
        max_in_flight=int(record["max_in_flight"]),
        models=tuple(json.loads(models)) if models is not None else None,
        created_at=float(record["created_at"]),
        webhook_url=record.get("webhook_url"),
        webhook_secret=record.get("webhook_secret"),
    )


def _key(record: dict[str, str]) -> ApiKey:
    return ApiKey(id=record["id"], account_id=record["account_id"], digest=record["digest"],
                  created_at=float(record["created_at"]), revoked_at=_optional_float(record.get("revoked_at")))


def _reservation(record: dict[str, str]) -> Reservation:
    return Reservation(
        job_id=record["job_id"],
        account_id=record["account_id"],
        key_id=record["key_id"],
        amount=int(record["amount"]),
        state=record["state"],
        created_at=float(record["created_at"]),
        settled_at=_optional_float(record.get("settled_at")),
    )


def _ledger_entry(raw: str) -> LedgerEntry:
    entry = json.loads(raw)
    return LedgerEntry(
        seq=int(entry["seq"]),
        at=float(entry["at"]),
        account_id=entry["account_id"],
        kind=entry["kind"],
        amount=int(entry["amount"]),
        reserved_change=int(entry["reserved_change"]),
        balance_after=int(entry["balance_after"]),
        reserved_after=int(entry["reserved_after"]),
        job_id=entry["job_id"],
        note=entry["note"],
    )
