"""One SQLite file in WAL mode: a connection per thread, and write transactions that lock up front.
The file and its companions are private (`fluxserve.private_files`)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fluxserve.private_files import PRIVATE_FILE, create_private_file, private_dir, tighten

# The files SQLite keeps beside a database (it creates them with the database file's mode).
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


# One writer lock per database file in this process: threads queue here for the write lock instead of
# in SQLite's busy handler, which sleeps in steps of up to 100 ms (other processes still meet it).
_WRITERS: dict[Path, threading.RLock] = {}
_WRITERS_LOCK = threading.Lock()


def _writer_lock(path: Path) -> threading.RLock:
    with _WRITERS_LOCK:
        return _WRITERS.setdefault(path.resolve(), threading.RLock())


class SqliteFile:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # The database's directory may be one the operator picked (`sqlite:///...`): made private when
        # missing, left alone when it exists. The data dir itself is tightened by the secrets' owner.
        private_dir(self.path.parent, tighten_existing=False)
        # An empty file is a valid database; made 0600 before SQLite opens it, so the WAL and shared
        # memory files it creates beside it get 0600 too.
        create_private_file(self.path)
        for suffix in _SQLITE_COMPANIONS:
            tighten(self.path.with_name(self.path.name + suffix), PRIVATE_FILE)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer = _writer_lock(self.path)

    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """`BEGIN IMMEDIATE`: the write lock is taken before the first read, so a read-check-write
        sequence inside is atomic across threads and processes sharing the file."""
        db = self.db()
        with self._writer:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()
