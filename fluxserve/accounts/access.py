"""The access layer of one process: the account store, the keyring, the price list and the auth mode.

`auth` (env FLUXSERVE_AUTH) is `required`, `off` or `auto` (the default). In `auto`, keys are
required as soon as any key exists or the server binds a non-loopback address; a fresh loopback
server with no keys stays open, so a first `make run` just works. A non-loopback bind that needs
keys but has none refuses to start; `off` is the explicit override, and it is logged.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from fluxserve.accounts import AccountStore
from fluxserve.accounts.keys import Keyring, server_secret
from fluxserve.accounts.money import price
from fluxserve.accounts.sqlite import SqliteAccountStore
from fluxserve.config import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: treat it as reachable from outside
        return False


def open_account_store(settings: Settings) -> AccountStore:
    """`accounts_store` when set; else the jobs' SQLite file (or the default one beside other stores)."""
    url = settings.accounts_store or settings.store
    if url and url.startswith("sqlite://"):
        return SqliteAccountStore(url.removeprefix("sqlite:///"))
    if settings.accounts_store:
        raise ValueError(f"Unsupported accounts store URL: {url!r} (use sqlite:///path/to/file)")
    return SqliteAccountStore(settings.sqlite_path)


class Access:
    def __init__(self, settings: Settings, store: AccountStore) -> None:
        self.settings = settings
        self.store = store
        self.keyring = Keyring(store, server_secret(settings))
        self._keys_exist = False

    @classmethod
    def open(cls, settings: Settings) -> Access:
        return cls(settings, open_account_store(settings))

    def enforced(self) -> bool:
        """Whether callers must present a valid key now."""
        mode = self.settings.auth
        if mode != "auto":
            return mode == "required"
        if not is_loopback(self.settings.host):
            return True
        # Keys are never deleted (only revoked), so once seen this stays true without asking again.
        self._keys_exist = self._keys_exist or self.store.has_keys()
        return self._keys_exist

    def refusal(self) -> str | None:
        """Why this server must not start, or None."""
        host = self.settings.host
        if self.settings.auth == "off" or is_loopback(host) or self.store.has_keys():
            return None
        return (
            f"Refusing to start: binding {host} makes this server reachable from the network, and no API "
            "key exists, so nobody could call it. Create one first with `fluxserve keys create --name NAME "
            "--credits N`, or bind 127.0.0.1, or pass `--auth off` (FLUXSERVE_AUTH=off) to serve without "
            "keys on purpose."
        )

    def announce(self) -> None:
        if self.settings.auth == "off":
            log.warning("AUTH IS OFF: anyone who can reach %s:%s can generate images (FLUXSERVE_AUTH=off)",
                        self.settings.host, self.settings.port)
        elif self.enforced():
            log.info("auth: API keys required (x-api-key or Authorization: Bearer)")
        else:
            log.info("auth: open (loopback bind and no API key yet; `fluxserve keys create` turns keys on)")

    def price(self, params: dict[str, Any]) -> int:
        return price(params, per_image=self.settings.price_per_image,
                     per_megapixel_step=self.settings.price_per_megapixel_step)

    def close(self) -> None:
        self.store.close()
