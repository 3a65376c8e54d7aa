"""Wiring: the store, the output store, the engine and the embedded worker for one process."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from fluxserve.config import Settings
from fluxserve.engine import Engine, load_engine
from fluxserve.faults import Faults
from fluxserve.jobs import JobStore
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.outputs import OutputStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.worker import Worker

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "No model configured: serving the tiny RANDOM-WEIGHT demo model (its images are noise). "
    "Point at real weights with FLUXSERVE_MODEL=<Hugging Face repo id | diffusers folder | "
    "transformer .safetensors> (or `fluxserve serve --model ...`)."
)


def open_store(settings: Settings) -> JobStore:
    url = settings.store
    if url is None or url.startswith("sqlite://"):
        path = url.removeprefix("sqlite:///") if url else settings.sqlite_path
        return SqliteJobStore(
            path,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            retention_seconds=settings.retention_seconds,
        )
    raise ValueError(f"Unsupported job store URL: {url!r} (use sqlite:///path/to/file)")


def open_outputs(settings: Settings) -> OutputStore:
    return LocalOutputStore(settings.outputs_dir)


@dataclass
class EngineSlot:
    """The engine as the API sees it: loading, ready, or failed with a reason."""

    state: str = "loading"
    engine: Engine | None = None
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.demo = not settings.model
        self.store = open_store(settings)
        self.outputs = open_outputs(settings)
        self.faults = Faults.parse(settings.faults)
        self.engine = EngineSlot()
        self.worker: Worker | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.demo:
            log.warning("=" * 20 + " DEMO MODE " + "=" * 20)
            log.warning(DEMO_WARNING)
        self._spawn(self._janitor, "janitor")
        if self.settings.worker:
            self._spawn(self._load_and_work, "engine-loader")

    def stop(self) -> None:
        self._stop.set()
        if self.worker is not None:
            self.worker.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.store.close()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_and_work(self) -> None:
        # Loading a real model takes a while; the API answers (and queues jobs) meanwhile.
        try:
            engine = load_engine(self.settings)
        except Exception as exc:
            log.exception("model failed to load")
            self.engine.state, self.engine.error = "failed", str(exc)
            return
        self.engine.engine, self.engine.state = engine, "ready"
        self.engine.ready.set()
        if self._stop.is_set():
            return
        self.worker = Worker(
            self.store,
            self.outputs,
            engine,
            lease_seconds=self.settings.lease_seconds,
            slugs=[self.settings.slug],
            faults=self.faults,
        )
        self.worker.start()

    def _janitor(self) -> None:
        while not self._stop.wait(self.settings.janitor_interval_seconds):
            self.purge_expired()

    def purge_expired(self) -> int:
        try:
            expired = self.store.purge_expired()
        except Exception:
            log.exception("purging expired jobs failed")
            return 0
        for job in expired:
            key = job.result.get("output_key")
            if key:
                self.outputs.delete(key)
        return len(expired)
