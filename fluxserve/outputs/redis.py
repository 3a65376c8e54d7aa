"""Output media in Redis, shared by every API replica and worker (for small fleets).

Each image is one string key `<prefix>:media:<key>`. The janitor deletes it with its job; a TTL a
little longer than the retention window is a safety net for when no janitor runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import redis

from fluxserve.outputs import CHUNK_BYTES
from fluxserve.redisconn import connect


class RedisOutputStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "fluxserve", ttl_seconds: float | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    @classmethod
    def from_url(cls, url: str, **options) -> RedisOutputStore:
        return cls(connect(url), **options)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:media:{key}"

    def put(self, key: str, data: bytes) -> None:
        ttl = int(self.ttl_seconds) + 1 if self.ttl_seconds else None
        self.client.set(self._key(key), data, ex=ttl)

    def get(self, key: str) -> bytes | None:
        data = self.client.get(self._key(key))
        return data if isinstance(data, bytes) else None

    def delete(self, key: str) -> None:
        self.client.delete(self._key(key))

    def link(self, key: str) -> str | None:
        return None  # served through the API

    def file_path(self, key: str) -> Path | None:
        return None

    def iter_chunks(self, key: str) -> Iterator[bytes] | None:
        name = self._key(key)
        size = int(self.client.strlen(name))
        if not size:
            return None
        return self._ranges(name, size)

    def _ranges(self, name: str, size: int) -> Iterator[bytes]:
        for start in range(0, size, CHUNK_BYTES):
            chunk = self.client.getrange(name, start, min(start + CHUNK_BYTES, size) - 1)
            if not isinstance(chunk, bytes) or not chunk:  # deleted while it was being read
                return
            yield chunk
