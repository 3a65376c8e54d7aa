"""One SQLite file in WAL mode: a connection per thread, and write transactions that lock up front.

Also the rule for files at rest, shared by everything that writes into the data dir: directories 0700,
files 0600, created so (never loosened first and tightened after). A database, secret or directory
found looser is tightened with a warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# The files SQLite keeps beside a database (it creates them with the database file's mode).
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def tighten(path: Path, private: int) -> None:
    """Take away group and other access from an existing path (with a warning); missing is fine."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & 0o077:
            path.chmod(current & private)
            log.warning("%s was open to other users (mode %o); tightened to %o", path, current, current & private)
    except FileNotFoundError:
        pass
    except OSError as exc:  # not ours to change: say so, and go on
        log.warning("%s is open to other users and could not be tightened: %s", path, exc)


def private_dir(path: Path, *, tighten_existing: bool = True) -> Path:
    """The directory, made 0700 if missing (missing parents get the usual mode); an existing one is
    tightened unless `tighten_existing` is false (a directory the operator chose for other things)."""
    if path.is_dir():
        if tighten_existing:
            tighten(path, PRIVATE_DIR)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    return path


def create_private_file(path: Path) -> None:
    """Make the file empty and 0600 unless it exists (then tighten it)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    except FileExistsError:
        tighten(path, PRIVATE_FILE)


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
