"""Blob stores for output media. The API serves what the worker stored, keyed by the job's id."""

from __future__ import annotations

from typing import Protocol


class OutputStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...

    def link(self, key: str) -> str | None:
        """A URL the client may fetch the media from directly (a pre-signed link), or None: the API serves it."""
        ...
