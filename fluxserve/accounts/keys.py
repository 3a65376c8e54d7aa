"""API keys: made here, shown once, stored only as an HMAC-SHA256 digest under a server secret.

A key reads `fsk_<id>_<secret>`. The id is public (it names the key in lists and logs and finds its
row); the secret part never leaves the caller. Checking a key recomputes the digest and compares it
in constant time. The same server secret signs media links.

The server secret is the deployment's: kept in the account store (`AccountStore.shared_secret`), made
once by whichever process asks first, so every replica sharing the store checks keys alike.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from fluxserve.accounts import Account, AccountStore, ApiKey
from fluxserve.private_files import private_dir, read_secret
from fluxserve.store_faults import is_transient

log = logging.getLogger(__name__)

KEY_PREFIX = "fsk_"
# The secret's name in the account store, and the file in the data dir that held it before.
SECRET_NAME = SECRET_FILE = "auth-secret"
MIN_SECRET_CHARS = 32


class KeyRejected(Exception):
    """The presented key is unknown, malformed or revoked (the message is safe to show)."""


def new_key() -> tuple[str, str]:
    """(key id, whole key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key.removeprefix(KEY_PREFIX).partition("_")
    return key_id if sep and key_id and secret else None


def server_secret(configured: str | None, data_dir: Path, store: AccountStore) -> bytes:
    """The configured secret when set; otherwise the deployment's, shared through the account store.

    A data dir from before the store kept the secret holds it in `auth-secret`: that value seeds the
    store (when the store has none yet), so the keys made with it stay valid. The data dir holds the
    database and the images, so where it exists it is tightened to 0700 here, where every process that
    serves or manages keys passes first (on a Redis or PostgreSQL store no data dir is needed)."""
    if data_dir.exists():
        private_dir(data_dir)
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    earlier = read_secret(path)
    if earlier is not None and len(earlier) < MIN_SECRET_CHARS:
        raise RuntimeError(f"{path} holds no usable secret; delete it only if no key was made with it")
    secret = store.shared_secret(SECRET_NAME, initial=earlier)
    if len(secret) < MIN_SECRET_CHARS:
        raise RuntimeError(f"the account store's {SECRET_NAME!r} is no usable secret")
    if earlier is not None and earlier != secret:
        log.warning("%s differs from the account store's secret, which is the one used: keys made under the "
                    "file's secret are not accepted (delete the file once that is as intended)", path)
    return secret.encode()


class Keyring:
    """Issues and checks keys under the server secret, read through `load_secret` once: at start-up, or,
    when the store is down then, at first use (so a process started during an outage recovers by itself)."""

    def __init__(self, store: AccountStore, load_secret: Callable[[], bytes]) -> None:
        self.store = store
        self._load_secret = load_secret
        self._loaded: bytes | None = None
        self._lock = threading.Lock()
        try:
            self._secret()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("the account store is unavailable (%s): the key secret is read once it answers", exc)

    def _secret(self) -> bytes:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_secret()
            return self._loaded

    def issue(self, account_id: str) -> tuple[ApiKey, str]:
        """A new key for the account: its record, and the whole key (to show once, never again)."""
        key_id, key = new_key()
        return self.store.add_key(key_id, account_id, self.digest(key)), key

    def authenticate(self, presented: str) -> tuple[Account, ApiKey]:
        key_id = key_id_of(presented)
        record = self.store.get_key(key_id) if key_id else None
        if record is None or not hmac.compare_digest(record.digest.encode(), self.digest(presented).encode()):
            raise KeyRejected("Invalid API key")
        if record.revoked_at is not None:
            raise KeyRejected("This API key has been revoked")
        account = self.store.get_account(record.account_id)
        if account is None:
            raise KeyRejected("Invalid API key")
        return account, record

    def digest(self, key: str) -> str:
        return self.sign(f"key:{key}")

    def sign(self, message: str) -> str:
        return hmac.new(self._secret(), message.encode(), hashlib.sha256).hexdigest()

    def verify(self, message: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(message).encode(), signature.encode())
