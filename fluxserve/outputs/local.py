"""Output media as files in one directory (the embedded default)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fluxserve.outputs import CHUNK_BYTES
from fluxserve.private_files import private_dir

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class LocalOutputStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        private_dir(self.root)  # 0700: images are served through the API, never read by other users

    def _path(self, key: str) -> Path:
        if not _SAFE_KEY.match(key) or ".." in key:
            raise KeyError(key)
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        # Write a temp file, flush it to disk, then rename it over the key (atomic within a directory): a
        # reader never sees half a file, and a crash never leaves one under the key. A write that fails
        # (disk full, I/O error) removes the temp file and raises its own error; whatever the key held
        # before stays whole. mkstemp creates the file 0600, and the rename keeps that mode.
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            _write_all(fd, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, KeyError):
            return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(KeyError):
            self._path(key).unlink(missing_ok=True)

    def link(self, key: str) -> str | None:
        return None  # served through the API

    def file_path(self, key: str) -> Path | None:
        try:
            path = self._path(key)
        except KeyError:
            return None
        return path if path.is_file() else None

    def iter_chunks(self, key: str) -> Iterator[bytes] | None:
        path = self.file_path(key)
        return _read_chunks(path) if path is not None else None


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (a write may be short), fsync, close; the first error is the one raised."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    os.close(fd)


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
