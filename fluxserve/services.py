"""Wiring: the store, the output store, the engine and the embedded worker for one process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fluxserve.accounts.access import Access
from fluxserve.accounts.settlement import settle_job, settle_open
from fluxserve.cancel import DeadlineWatcher
from fluxserve.config import Settings
from fluxserve.engine import Engine, load_engine
from fluxserve.faults import Faults
from fluxserve.jobs import JobStore
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.metrics import Metrics
from fluxserve.moderation import load_moderation
from fluxserve.outputs import OutputStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.webhooks.delivery import WebhookSender
from fluxserve.webhooks.owners import OwnerWebhooks
from fluxserve.worker import Worker

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "No model configured: serving the tiny RANDOM-WEIGHT demo model (its images are noise). "
    "Point at real weights with FLUXSERVE_MODEL=<Hugging Face repo id | diffusers folder | "
    "transformer .safetensors> (or `fluxserve serve --model ...`)."
)


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


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
    if url.startswith(_REDIS_SCHEMES):
        from fluxserve.jobs.redis import RedisJobStore

        return RedisJobStore.from_url(
            url,
            prefix=settings.redis_prefix,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            retention_seconds=settings.retention_seconds,
        )
    raise ValueError(f"Unsupported job store URL: {url!r} (use sqlite:///path/to/file or redis://host:port/db)")


def open_outputs(settings: Settings) -> OutputStore:
    url = settings.output_store
    if url and url.startswith(_REDIS_SCHEMES):
        from fluxserve.outputs.redis import RedisOutputStore

        # Outlives its job's record by a margin; the janitor normally deletes it first.
        return RedisOutputStore.from_url(url, prefix=settings.redis_prefix,
                                         ttl_seconds=settings.retention_seconds + 3600)
    if url and url.startswith("s3://"):
        from fluxserve.outputs.s3 import S3OutputStore

        return S3OutputStore.from_url(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                                      presign_seconds=settings.s3_presign_seconds)
    if url:
        raise ValueError(f"Unsupported output store URL: {url!r} (use redis://... or s3://bucket/prefix)")
    return LocalOutputStore(settings.outputs_dir)


@dataclass
class EngineSlot:
    """The engine as the API sees it: loading, ready, or failed with a reason."""

    state: str = "loading"
    engine: Engine | None = None
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Services:
    def __init__(
        self,
        settings: Settings,
        *,
        serves_api: bool = True,
        engine_loader: Callable[[Settings], Engine] = load_engine,
    ) -> None:
        self.settings = settings
        # How the embedded worker gets its engine (a test or a benchmark may hand in one it built).
        self.engine_loader = engine_loader
        # A `fluxserve worker` process answers only /health, /ready and /metrics: no keys to enforce.
        self.serves_api = serves_api
        self.demo = not settings.model
        self.store = open_store(settings)
        self.outputs = open_outputs(settings)
        self.faults = Faults.parse(settings.faults)
        self.access = Access.open(settings)
        self.engine = EngineSlot()
        self.webhooks = OwnerWebhooks(settings, self.access.store)
        self.deadlines = DeadlineWatcher(self.store)
        self.webhook_sender = WebhookSender.from_settings(self.store, self.webhooks, settings)
        self.workers: list[Worker] = []
        self.metrics = Metrics()
        self.metrics.watch_store(self.store.count_by_state)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.demo:
            log.warning("=" * 20 + " DEMO MODE " + "=" * 20)
            log.warning(DEMO_WARNING)
        if self.serves_api:
            refusal = self.access.refusal()
            if refusal:
                raise RuntimeError(refusal)
            self.access.announce()
        self._spawn(self._janitor, "janitor")
        self.webhook_sender.start()
        if self.settings.worker:
            self._spawn(self._load_and_work, "engine-loader")
        else:
            self.engine.state = "external"  # `fluxserve worker` processes run the model

    def readiness(self) -> dict[str, str]:
        """What must be up before this process takes traffic: the store, and the model if it runs jobs."""
        checks = {"store": "ok" if self.store.ping() else "unreachable"}
        if self.settings.worker:
            checks["engine"] = self.engine.state
        return checks

    def stop(self) -> None:
        self._stop.set()
        # Drain: every worker stops claiming at once, then each finishes the job in hand.
        for worker in self.workers:
            worker.stop(timeout=0)
        for worker in self.workers:
            worker.stop()
        self.webhook_sender.stop()
        self.deadlines.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.store.close()
        self.access.close()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_and_work(self) -> None:
        # Loading a real model takes a while; the API answers (and queues jobs) meanwhile.
        try:
            self.faults.before_load()
            engine = self.engine_loader(self.settings)
            moderation = load_moderation(self.settings)
        except Exception as exc:
            log.exception("model failed to load")
            self.engine.state, self.engine.error = "failed", str(exc)
            return
        self.engine.engine, self.engine.state = engine, "ready"
        self.engine.ready.set()
        if self._stop.is_set():
            return
        for _ in range(self.settings.worker_concurrency):
            worker = Worker(
                self.store,
                self.outputs,
                engine,
                lease_seconds=self.settings.lease_seconds,
                slugs=self.settings.worker_slugs,
                faults=self.faults,
                metrics=self.metrics,
                on_finished=self.settle,
                previews=self.settings.previews,
                moderation=moderation,
            )
            self.workers.append(worker)
            worker.start()

    def _janitor(self) -> None:
        while not self._stop.wait(self.settings.janitor_interval_seconds):
            self.settle_open()
            self.purge_expired()

    def settle(self, job_id: str) -> None:
        """Charge or release a just-finished job's credits (the janitor's sweep catches any miss)."""
        settle_job(self.access.store, self.store.get(job_id))

    def settle_open(self) -> int:
        try:
            return settle_open(self.access.store, self.store)
        except Exception:
            log.exception("settling open reservations failed")
            return 0

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
