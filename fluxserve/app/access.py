"""Who is calling, and what they may see.

A caller presents an API key (`x-api-key`, as the segmind SDK sends it, or `Authorization: Bearer`);
it names an account. 401 for a missing, unknown or revoked key; 403 for a model the key may not use
or a job another account made. Keys are never logged or echoed.

`auth` (env FLUXSERVE_AUTH) is `required`, `off` or `auto` (the default). In `auto`, keys are
required as soon as any key exists or the server binds a non-loopback address; a fresh loopback
server with no keys stays open, so a first `make run` just works. A non-loopback bind that needs
keys but has none refuses to start; `off` is the explicit override, and it is logged.

Signed media links: the media URL of a job made with a key carries `?exp=&kid=&sig=` (an HMAC of the
job id, the expiry and the key id under the server secret), so its owner can hand the link on without
the key. A link expires when the job's retention ends (its media is deleted then anyway), and
revoking the key that made the job voids its links at once; a link is never a way around either.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from fluxserve.accounts import Account, AccountStore, ApiKey
from fluxserve.accounts.keys import KeyRejected, Keyring, server_secret
from fluxserve.app.errors import Forbidden, Unauthenticated
from fluxserve.config import AccountSettings
from fluxserve.jobs import Job
from fluxserve.store_faults import is_transient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """The authenticated account and key; both None while auth is not enforced (anyone may call)."""

    account: Account | None = None
    key: ApiKey | None = None

    @property
    def account_id(self) -> str | None:
        return self.account.id if self.account else None


ANONYMOUS = Caller()
KEYS_RECHECK_SECONDS = 1.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: treat it as reachable from outside
        return False


class Access:
    def __init__(self, config: AccountSettings, store: AccountStore, *, host: str, data_dir: Path) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.loopback = is_loopback(host)
        self.keyring = Keyring(store, lambda: server_secret(config.auth_secret, data_dir, store))
        self._keys_exist = False
        self._keys_checked_at = float("-inf")

    def enforced(self) -> bool:
        """Whether callers must present a valid key now."""
        known = self._enforced_without_store()
        if known is not None:
            return known
        self._keys_exist, self._keys_checked_at = self.store.has_keys(), time.monotonic()
        return self._keys_exist

    def _enforced_without_store(self) -> bool | None:
        """`enforced()` when no store call is needed; None when the store must be asked. Keys are never
        deleted (only revoked), so once seen they stay on without asking again; until then the store is
        asked at most once a second (a new key turns keys on within it)."""
        mode = self.config.auth
        if mode != "auto":
            return mode == "required"
        if not self.loopback or self._keys_exist:
            return True
        if time.monotonic() - self._keys_checked_at < KEYS_RECHECK_SECONDS:
            return False
        return None

    def refusal(self) -> str | None:
        """Why this server must not start, or None."""
        if self.config.auth == "off" or self.loopback or self.store.has_keys():
            return None
        return (
            f"Refusing to start: binding {self.host} makes this server reachable from the network, and no API "
            "key exists, so nobody could call it. Create one first with `fluxserve keys create --name NAME "
            "--credits N`, or bind 127.0.0.1, or pass `--auth off` (FLUXSERVE_AUTH=off) to serve without "
            "keys on purpose."
        )

    def announce(self, port: int) -> None:
        if self.config.auth == "off":
            log.warning("AUTH IS OFF: anyone who can reach %s:%s can generate images (FLUXSERVE_AUTH=off)",
                        self.host, port)
            return
        try:
            enforced = self.enforced()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("auth: the account store is unavailable (%s); keys are checked once it answers", exc)
            return
        if enforced:
            log.info("auth: API keys required (x-api-key or Authorization: Bearer)")
        else:
            log.info("auth: open (loopback bind and no API key yet; `fluxserve keys create` turns keys on)")

    def caller_known_without_store(self) -> Caller | None:
        """The caller when no store call can change the answer (open mode, its key check fresh): so the
        API need not hop to a thread to ask. None: ask `authenticate`."""
        return ANONYMOUS if self._enforced_without_store() is False else None

    def authenticate(self, presented_key: str | None) -> Caller:
        if not self.enforced():
            return ANONYMOUS
        if presented_key is None:
            raise Unauthenticated("Missing API key: send it in the x-api-key header or as Authorization: Bearer")
        try:
            account, record = self.keyring.authenticate(presented_key)
        except KeyRejected as exc:
            raise Unauthenticated(str(exc)) from None
        return Caller(account, record)

    @staticmethod
    def authorize_model(caller: Caller, slug: str) -> None:
        if caller.account is not None and not caller.account.allows(slug):
            raise Forbidden(f"This API key is not allowed to use the model {slug}")

    @staticmethod
    def authorize_job(caller: Caller, job: Job) -> None:
        if caller.account is not None and job.owner != caller.account.id:
            raise Forbidden(f"Request {job.id} belongs to another account")

    def media_query(self, job: Job) -> str:
        """The signed query for the job's media URL (empty for a job made without a key, or not ended)."""
        if job.owner is None or job.meta.key_id is None or job.expires_at is None:
            return ""
        expires = int(job.expires_at)
        signature = self.keyring.sign(_media_message(job.id, expires, job.meta.key_id))
        return "?" + urlencode({"exp": expires, "kid": job.meta.key_id, "sig": signature})

    def check_media_link(self, job_id: str, query: Mapping[str, str]) -> bool:
        """True for a valid, live link to the job's media; False when the query signs nothing (the
        caller's key decides then); Forbidden for a link that expired or whose key was revoked."""
        signature, expires, key_id = query.get("sig"), query.get("exp", ""), query.get("kid", "")
        if not signature or not expires.isdigit() or not key_id:
            return False
        if not self.keyring.verify(_media_message(job_id, int(expires), key_id), signature):
            return False
        if int(expires) <= time.time():
            raise Forbidden("This media link has expired; fetch the result again for a fresh one")
        key = self.store.get_key(key_id)
        if key is None or key.revoked_at is not None:
            raise Forbidden("This media link was revoked with the API key that made its request")
        return True


def _media_message(job_id: str, expires: int, key_id: str) -> str:
    return f"media:{job_id}:{expires}:{key_id}"
