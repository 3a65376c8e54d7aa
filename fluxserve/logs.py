"""Logging: JSON lines (or plain text) that carry the request id and the job id they concern.

The API's middleware opens a context per HTTP request (`request_context`); code that learns which
job the request is about adds it (`annotate(job_id=...)`); the worker opens one per job. Every log
record made inside such a context gets those fields, including records made in worker threads that
anyio starts for the request (they run in a copy of the request's context).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

_context: ContextVar[dict[str, Any] | None] = ContextVar("fluxserve_log_context", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Fields for every record logged until the block ends (the dict is shared, so it can grow)."""
    current = {**(_context.get() or {}), **fields}
    token = _context.set(current)
    try:
        yield current
    finally:
        _context.reset(token)


def annotate(**fields: Any) -> None:
    """Add fields to the current context (no-op outside one)."""
    current = _context.get()
    if current is not None:
        current.update(fields)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging for a process: `json` (one object per line) or `text`, with the context fields."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp="time",
                          rename_fields={"levelname": "level", "name": "logger"},
                          reserved_attrs=[*RESERVED_ATTRS, "color_message"])  # uvicorn's ANSI copy
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own loggers propagate here (it is started with log_config=None).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
