"""Per-owner webhook settings: the signing secret and the default URL for a job's owner.

A job made with an API key belongs to that key's account, and the account's own settings answer:
its secret (made with the account, rotated with `fluxserve keys webhook NAME --rotate-secret`) and
its default URL (none until set), so no account can verify, or receive, another's webhooks.
A job without an owner (keys are off) gets the operator's settings (`webhook_secret`,
`webhook_default_url`); with no secret configured, one is generated on first use and kept in
`data_dir/webhook-secret` (readable by the operator only), so signatures survive restarts.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fluxserve.accounts import AccountStore
from fluxserve.config import WebhookSettings
from fluxserve.private_files import PRIVATE_FILE, read_or_create_secret, tighten
from fluxserve.webhooks.signing import new_secret, secret_bytes

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"


class OwnerWebhooks:
    def __init__(self, config: WebhookSettings, accounts: AccountStore, data_dir: Path) -> None:
        self.config = config
        self.accounts = accounts
        self.data_dir = data_dir
        self._secret: str | None = config.secret
        self._lock = threading.Lock()
        if self._secret is not None:
            secret_bytes(self._secret)  # fail at start-up, not at the first delivery
        tighten(data_dir / SECRET_FILE, PRIVATE_FILE)  # one made by hand may be readable by others

    def default_url(self, owner: str | None) -> str | None:
        """Where the owner's requests that name no webhook are reported (None: nowhere)."""
        if owner is None:
            return self.config.default_url
        account = self.accounts.get_account(owner)
        return account.webhook_url if account else None

    def secret(self, owner: str | None) -> str:
        """The `whsec_…` secret that signs webhooks for the owner's requests."""
        account = self.accounts.get_account(owner) if owner is not None else None
        if account is not None and account.webhook_secret:
            return account.webhook_secret
        if owner is not None:  # accounts are never deleted, so this is a store that lost one
            log.warning("no webhook secret for account %s; signing with the operator's", owner)
        return self._operator_secret()

    def _operator_secret(self) -> str:
        with self._lock:
            if self._secret is None:
                self._secret = read_or_create_secret(self.data_dir / SECRET_FILE, new_secret)
            return self._secret
