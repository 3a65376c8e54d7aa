"""Files at rest, for everything that writes into the data dir: directories 0700, files 0600, created so
(never loosened first and tightened after). A database, secret or directory found looser is tightened
with a warning."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


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


def read_or_create_secret(path: Path, new: Callable[[], str]) -> str:
    """The secret kept in `path`, made once with `new()` when there is none. It is written aside (0600)
    and linked into place: the link fails if another process won the race, so all agree on one secret,
    and nobody ever reads a half-written one."""
    if path.exists():
        tighten(path, PRIVATE_FILE)
    else:
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        with os.fdopen(fd, "w") as out:
            out.write(new() + "\n")
        try:
            os.link(tmp, path)
            log.info("%s created (readable by its owner only)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def read_secret(path: Path) -> str | None:
    """The secret kept in `path` (tightened to 0600 if it was looser), or None when there is none."""
    try:
        tighten(path, PRIVATE_FILE)
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
