"""One SQLite file in WAL mode: a connection per thread, and write transactions that lock up front.
The file and its companions are private (`fluxserve.private_files`).

A file is checked (`PRAGMA quick_check`) the first time this process opens it: a corrupt one is refused
with what to do about it, instead of failing later on whichever query meets the damage. A write waits
for the file's write lock at most `WRITE_WAIT_SECONDS` (then "database is locked": a transient fault the
API answers 503 and a worker retries), so a lock held for long never piles up threads without end.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fluxserve.private_files import PRIVATE_FILE, create_private_file, private_dir, tighten

# The files SQLite keeps beside a database (it creates them with the database file's mode).
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

# How long a write waits for the write lock (held by this process or another) before giving up.
WRITE_WAIT_SECONDS = 5.0
# The table the readiness probe writes its one row to.
_PROBE_TABLE = "fluxserve_write_probe"
# quick_check stops after this many problems, and the message shows this much of them.
_CHECK_ERRORS = 3
_DETAIL_CHARS = 300
# quick_check's verdicts that mean the file itself is damaged (anything else it raises is not a verdict).
_CORRUPT_ERRORS = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


class CorruptDatabase(RuntimeError):
    """The SQLite file failed `PRAGMA quick_check`: the message says which file and what to do."""

    def __init__(self, path: Path, detail: str) -> None:
        detail = "; ".join(line.strip() for line in detail.splitlines() if line.strip())
        if len(detail) > _DETAIL_CHARS:
            detail = detail[:_DETAIL_CHARS].rsplit(";", 1)[0] + "; ..."
        super().__init__(
            f"Refusing to open {path}: the SQLite database is corrupt (quick_check: {detail}). "
            f"Restore it from a backup, or move it and its -wal/-shm files aside to start with an empty one."
        )
        self.path = path


# One writer lock per database file in this process: threads queue here for the write lock instead of
# in SQLite's busy handler, which sleeps in steps of up to 100 ms (other processes still meet it).
_WRITERS: dict[Path, threading.RLock] = {}
_WRITERS_LOCK = threading.Lock()
# Files this process has checked already (the jobs and the accounts stores may share one).
_CHECKED: set[Path] = set()


def _writer_lock(path: Path) -> threading.RLock:
    with _WRITERS_LOCK:
        return _WRITERS.setdefault(path.resolve(), threading.RLock())


def _locked(path: Path, waited: float) -> sqlite3.OperationalError:
    """The error SQLite itself raises when its busy timeout runs out (a transient fault)."""
    error = sqlite3.OperationalError(f"database is locked (waited {waited:.1f}s for the write lock of {path})")
    error.sqlite_errorname = "SQLITE_BUSY"
    return error


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back what is left of a failed transaction. SQLite may have rolled it back already (a full
    disk, an I/O error, a busy COMMIT): then there is nothing to do, and the first error is the one to tell."""
    if db.in_transaction:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")


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
        self._probe_db: sqlite3.Connection | None = None
        self._probe_lock = threading.Lock()
        self._check_intact()

    def _connect(self, timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect(WRITE_WAIT_SECONDS)
            self._local.db = db
            self._local.busy_ms = int(WRITE_WAIT_SECONDS * 1000)
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _check_intact(self) -> None:
        """Refuse a corrupt file (CorruptDatabase): `quick_check` either raises or answers rows other than 'ok'."""
        key = self.path.resolve()
        with _WRITERS_LOCK:
            if key in _CHECKED:
                return
        try:
            rows = [row[0] for row in self.db().execute(f"PRAGMA quick_check({_CHECK_ERRORS})").fetchall()]
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "").startswith(_CORRUPT_ERRORS):
                self.close()
                raise CorruptDatabase(self.path, str(exc)) from None
            raise  # locked, full, unreadable: not a verdict on the file
        if rows != ["ok"]:
            self.close()
            raise CorruptDatabase(self.path, str(rows[0]) if rows else "no answer")
        with _WRITERS_LOCK:
            _CHECKED.add(key)

    @contextmanager
    def transaction(self, timeout: float = WRITE_WAIT_SECONDS) -> Iterator[sqlite3.Connection]:
        """`BEGIN IMMEDIATE`: the write lock is taken before the first read, so a read-check-write
        sequence inside is atomic across threads and processes sharing the file.

        Waits at most `timeout` seconds for the lock (this process's writers, then other processes'),
        then raises "database is locked". A failed COMMIT rolls back: the connection never stays inside
        a transaction (holding the lock) after an error."""
        db = self.db()
        started = time.monotonic()
        if not self._writer.acquire(timeout=timeout):
            raise _locked(self.path, time.monotonic() - started)
        try:
            busy_ms = max(1, int((timeout - (time.monotonic() - started)) * 1000))
            if busy_ms != getattr(self._local, "busy_ms", None):
                db.execute(f"PRAGMA busy_timeout={busy_ms}")
                self._local.busy_ms = busy_ms
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        finally:
            self._writer.release()

    def probe_write(self, timeout: float = 0.5) -> None:
        """Commit one tiny write (a row in a table of its own), waiting at most `timeout` for the lock:
        raises what a real write would meet (locked, disk full, read-only), for the readiness check.
        On a connection of its own, so it never waits behind this process's queued writers' threads."""
        with self._probe_lock:
            if self._probe_db is None:
                self._probe_db = self._connect(timeout)
            db = self._probe_db
            db.execute(f"PRAGMA busy_timeout={max(1, int(timeout * 1000))}")
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"CREATE TABLE IF NOT EXISTS {_PROBE_TABLE} (id INTEGER PRIMARY KEY, at REAL NOT NULL)")
                db.execute(f"INSERT OR REPLACE INTO {_PROBE_TABLE} (id, at) VALUES (1, ?)", (time.time(),))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        with self._probe_lock:
            if self._probe_db is not None:
                self._probe_db.close()
                self._probe_db = None
        self._local = threading.local()
