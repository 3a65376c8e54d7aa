"""Per-owner webhook settings: the signing secret and the default URL for a job's owner.

A job made with an API key belongs to that key's account, and the account's own settings answer:
its secret (made with the account, rotated with `fluxserve keys webhook NAME --rotate-secret`) and
its default URL (none until set), so no account can verify, or receive, another's webhooks.
A job without an owner (keys are off) gets the operator's settings (`webhook_secret`,
`webhook_default_url`); with no secret configured, the deployment's shared one is used: made once in
the account store by whichever process asks first, so every replica signs alike and signatures
survive restarts. A data dir from before the store kept it holds it in `data_dir/webhook-secret`,
which seeds the store (when the store has none yet), so receivers set up with it keep verifying.
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path

from fluxserve.accounts import AccountStore
from fluxserve.config import WebhookSettings
from fluxserve.private_files import PRIVATE_FILE, read_secret, tighten
from fluxserve.webhooks.signing import SECRET_PREFIX, secret_bytes

log = logging.getLogger(__name__)

# The secret's name in the account store, and the file in the data dir that held it before.
SECRET_NAME = SECRET_FILE = "webhook-secret"


def as_webhook_secret(shared: str) -> str:
    """A Standard Webhooks secret (`whsec_` + base64) from the store's shared secret: a value seeded
    from the old file already is one; a generated one is hex, whose bytes become the key."""
    if shared.startswith(SECRET_PREFIX):
        return shared
    try:
        key = bytes.fromhex(shared)
    except ValueError:
        key = shared.encode()
    return SECRET_PREFIX + base64.b64encode(key).decode("ascii")


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
                earlier = read_secret(self.data_dir / SECRET_FILE)
                secret = as_webhook_secret(self.accounts.shared_secret(SECRET_NAME, initial=earlier))
                secret_bytes(secret)  # a store value that is no usable secret fails here, loudly
                self._secret = secret
            return self._secret
