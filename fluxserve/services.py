"""The composition root: one process's stores, use cases, engine, worker and background loops.

Everything is built here from `Settings`, each part from its own group; the HTTP layer
(`fluxserve.api`) and the CLI are the only other places that know how the parts fit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fluxserve.app.access import Access
from fluxserve.app.billing import Billing
from fluxserve.app.control import Control, DeadlineWatcher
from fluxserve.app.results import Results
from fluxserve.app.submit import Submitter
from fluxserve.app.webhook_owners import OwnerWebhooks
from fluxserve.config import Settings
from fluxserve.engine import Engine, load_engine
from fluxserve.metrics import Metrics
from fluxserve.moderation import load_moderation
from fluxserve.store_faults import is_transient
from fluxserve.stores import describe, open_all
from fluxserve.webhooks.delivery import WebhookSender
from fluxserve.worker import Worker

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "No model configured: serving the tiny RANDOM-WEIGHT demo model (its images are noise). "
    "Point at real weights with FLUXSERVE_MODEL=<Hugging Face repo id | diffusers folder | "
    "transformer .safetensors> (or `fluxserve serve --model ...`)."
)

EngineLoader = Callable[[Settings], Engine]


@dataclass
class EngineSlot:
    """The engine as the API sees it: loading, ready, failed with a reason, or external (other processes)."""

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
        engine_loader: EngineLoader = load_engine,
    ) -> None:
        self.settings = settings
        # A `fluxserve worker` process answers only /health, /ready and /metrics: no keys to enforce.
        self.serves_api = serves_api
        # How the embedded worker gets its engine (a test or a benchmark may hand in one it built).
        self.engine_loader = engine_loader
        self.demo = not settings.model.model
        self.jobs, self.outbox, self.outputs, self.accounts = open_all(settings)
        self.access = Access(settings.accounts, self.accounts, host=settings.host, data_dir=settings.data_dir)
        self.billing = Billing(self.accounts, self.jobs, settings.accounts)
        self.webhook_owners = OwnerWebhooks(settings.webhooks, self.accounts, settings.data_dir)
        self.deadlines = DeadlineWatcher(self.jobs)
        self.engine = EngineSlot()
        self.submitter = Submitter(
            slug=settings.model.slug,
            jobs=self.jobs,
            accounts=self.accounts,
            access=self.access,
            billing=self.billing,
            webhooks=self.webhook_owners,
            deadlines=self.deadlines,
            allow_private_webhooks=settings.webhooks.allow_private,
            model_unavailable=self._model_unavailable,
        )
        self.control = Control(self.jobs, self.access, self.billing)
        self.results = Results(self.jobs, self.outbox, self.outputs, self.access, self.billing)
        self.webhook_sender = WebhookSender(
            self.jobs, self.outbox, self.webhook_owners.secret, self.access.media_query, settings.webhooks,
            default_base_url=(settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/"),
        )
        self.workers: list[Worker] = []
        self.metrics = Metrics()
        self.metrics.watch_store(self.jobs.count_by_state)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        store, sqlite = self.settings.store.url, self.settings.sqlite_path
        log.info("shared state: jobs on the %s; accounts on the %s", describe(store, sqlite),
                 describe(self.settings.accounts.store_url or store, sqlite))
        if self.demo:
            log.warning("=" * 20 + " DEMO MODE " + "=" * 20)
            log.warning(DEMO_WARNING)
        if self.serves_api:
            refusal = self.access.refusal()
            if refusal:
                raise RuntimeError(refusal)
            self.access.announce(self.settings.port)
        self._spawn(self._janitor, "janitor")
        self.webhook_sender.start()
        if self.settings.worker.embedded:
            self._spawn(self._load_and_work, "engine-loader")
        else:
            self.engine.state = "external"  # `fluxserve worker` processes run the model

    def readiness(self) -> dict[str, str]:
        """What must be up before this process takes traffic: the store, and the model if it runs jobs."""
        checks = {"store": "ok" if self.jobs.ping() else "unreachable"}
        if self.settings.worker.embedded:
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
        self.jobs.close()
        self.accounts.close()

    def _model_unavailable(self) -> str | None:
        if self.engine.state == "failed" and self.settings.worker.embedded:
            return self.engine.error
        return None

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_and_work(self) -> None:
        # Loading a real model takes a while; the API answers (and queues jobs) meanwhile.
        try:
            engine = self.engine_loader(self.settings)
            moderation = load_moderation(self.settings.moderation)
        except Exception as exc:
            log.exception("model failed to load")
            self.engine.state, self.engine.error = "failed", str(exc)
            return
        self.engine.engine, self.engine.state = engine, "ready"
        self.engine.ready.set()
        if self._stop.is_set():
            return
        for _ in range(self.settings.worker.concurrency):
            worker = Worker(
                self.jobs,
                self.outputs,
                engine,
                lease_seconds=self.settings.store.lease_seconds,
                slugs=self.settings.worker_slugs,
                metrics=self.metrics,
                on_finished=self.billing.settle_id,
                previews=self.settings.worker.previews,
                moderation=moderation,
            )
            self.workers.append(worker)
            worker.start()

    def _janitor(self) -> None:
        while not self._stop.wait(self.settings.store.janitor_interval_seconds):
            self.settle_open()
            self.purge_expired()

    def settle_open(self) -> int:
        try:
            return self.billing.settle_open()
        except Exception as exc:
            _log_janitor_error("settling open reservations", exc)
            return 0

    def purge_expired(self) -> int:
        try:
            expired = self.jobs.purge_expired()
        except Exception as exc:
            _log_janitor_error("purging expired jobs", exc)
            return 0
        for job in expired:
            if job.result is not None:
                self.outputs.delete(job.result.output_key)
        return len(expired)


def _log_janitor_error(what: str, exc: Exception) -> None:
    """A store outage is weather (one line, the next round retries); anything else is a bug (traceback)."""
    if is_transient(exc):
        log.warning("%s: the store is unavailable (%s); the next round retries", what, exc)
    else:
        log.exception("%s failed", what)
