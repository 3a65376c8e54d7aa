"""Per-owner webhook settings: the signing secret and the default URL for a job's owner.

This is the seam to accounts: today every owner gets the operator's settings (`webhook_secret`,
`webhook_default_url`); an accounts backend overrides `secret` and `default_url` to answer per API key. With no secret configured, one is generated on first use and kept in
`data_dir/webhook-secret` (readable by the operator only), so signatures survive restarts.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from fluxserve.config import Settings
from fluxserve.webhooks.signing import new_secret, secret_bytes

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"


class OwnerWebhooks:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._secret: str | None = settings.webhook_secret
        self._lock = threading.Lock()
        if self._secret is not None:
            secret_bytes(self._secret)  # fail at start-up, not at the first delivery

    def default_url(self, owner: str | None) -> str | None:
        """Where the owner's requests that name no webhook are reported (None: nowhere)."""
        return self.settings.webhook_default_url

    def secret(self, owner: str | None) -> str:
        """The `whsec_…` secret that signs webhooks for the owner's requests."""
        with self._lock:
            if self._secret is None:
                self._secret = _load_or_create_secret(self.settings.data_dir / SECRET_FILE)
            return self._secret


def _load_or_create_secret(path: Path) -> str:
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process sharing the data directory was first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    log.info("webhook signing secret generated in %s (set FLUXSERVE_WEBHOOK_SECRET to choose one)", path)
    return secret
