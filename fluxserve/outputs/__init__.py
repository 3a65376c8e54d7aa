"""Blob stores for output media. The API serves what the worker stored, keyed by the job's id.

Serving never reads a whole image into memory: a local file is sent from disk (with Range support),
other stores hand out a pre-signed link or the bytes a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

CHUNK_BYTES = 256 * 1024


class OutputStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...

    def link(self, key: str) -> str | None:
        """A URL the client may fetch the media from directly (a pre-signed link), or None: the API serves it."""
        ...

    def file_path(self, key: str) -> Path | None:
        """The local file holding the media, when there is one (the API sends it from disk)."""
        ...

    def iter_chunks(self, key: str) -> Iterator[bytes] | None:
        """The media a chunk at a time, or None when there is none."""
        ...
