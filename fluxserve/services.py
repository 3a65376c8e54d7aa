"""The composition root: one process's stores, use cases, engine, worker and background loops.

Everything is built here from `Settings`, each part from its own group; the HTTP layer
(`fluxserve.api`) and the CLI are the only other places that know how the parts fit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fluxserve.app.access import Access
from fluxserve.app.billing import Billing
from fluxserve.app.control import Control, DeadlineWatcher
from fluxserve.app.models import ModelDirectory
from fluxserve.app.results import Results
from fluxserve.app.submit import Submitter
from fluxserve.app.webhook_owners import OwnerWebhooks
from fluxserve.catalog import model_table, worker_slugs
from fluxserve.config import Settings
from fluxserve.engine import Engine, load_engine
from fluxserve.engine.lora import LoraRegistry
from fluxserve.jobs import Job
from fluxserve.metrics import Metrics
from fluxserve.moderation import Moderation, load_moderation
from fluxserve.presence import Advertiser, PresenceView
from fluxserve.store_faults import is_transient
from fluxserve.stores import describe, open_all, open_presence
from fluxserve.webhooks.delivery import WebhookSender
from fluxserve.worker import Worker, new_worker_id

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "No model configured: serving the tiny RANDOM-WEIGHT demo model (its images are noise). "
    "Point at real weights with FLUXSERVE_MODEL=<Hugging Face repo id | diffusers folder | "
    "transformer .safetensors> (or `fluxserve serve --model ...`)."
)

# Called with each model's own settings (`settings.model.slug` says which).
EngineLoader = Callable[[Settings], Engine]


@dataclass
class EngineSlot:
    """The engine as the API sees it: loading, ready, failed with a reason, or external (other processes)."""

    state: str = "loading"
    engine: Engine | None = None
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


EXTERNAL = EngineSlot(state="external")  # `fluxserve worker` processes run the models


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
        # Every served model's own settings (fluxserve/catalog.py); the models this process's worker runs.
        self.models = model_table(settings)
        local = worker_slugs(settings, self.models) if settings.worker.embedded else []
        self.engines = {slug: EngineSlot() for slug in local}
        self.demo = settings.model.slug in self.models and not self.models[settings.model.slug].model.model
        self.jobs, self.outbox, self.outputs, self.accounts = open_all(settings)
        # Which models the fleet's workers serve (adverts in the shared store, this process's among them).
        self.presence = open_presence(settings.store, settings.sqlite_path)
        self.advertiser = Advertiser(self.presence, new_worker_id(), self.engines, settings.worker.presence_seconds)
        # The per-request LoRA adapters each model's requests may name (its settings' `lora_dir`; the workers
        # build the same registries from the same settings).
        self.loras = {slug: LoraRegistry.from_settings(model.model) for slug, model in self.models.items()}
        # The model a request that names none gets (OpenAI's `model` left out): the default slug, else the first.
        default = settings.model.slug if settings.model.slug in self.models else next(iter(self.models))
        self.directory = ModelDirectory(self.models, self.engines, PresenceView(self.presence), default=default,
                                        created=int(time.time()), own_worker=self.advertiser.worker_id)
        self.access = Access(settings.accounts, self.accounts, host=settings.host, data_dir=settings.data_dir)
        self.billing = Billing(self.accounts, self.jobs, settings.accounts)
        self.webhook_owners = OwnerWebhooks(settings.webhooks, self.accounts, settings.data_dir)
        self.deadlines = DeadlineWatcher(self.jobs)
        prices = {slug: Billing(self.accounts, self.jobs, model.accounts) for slug, model in self.models.items()
                  if model.accounts != settings.accounts}
        self.submitter = Submitter(
            slug=settings.model.slug,
            jobs=self.jobs,
            accounts=self.accounts,
            access=self.access,
            billing=self.billing,
            webhooks=self.webhook_owners,
            deadlines=self.deadlines,
            allow_private_webhooks=settings.webhooks.allow_private,
            model_unavailable=self.directory.unavailable,
            slugs=self.models,
            billing_for=lambda slug: prices.get(slug, self.billing),
            loras_for=self.loras.get,
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
        # Set once a drain began (SIGTERM to `fluxserve worker`): no more claims, /ready answers 503.
        self.draining = threading.Event()
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
            self.advertiser.start()
            self._spawn(self._load_and_work, "engine-loader")

    def readiness(self) -> dict[str, str]:
        """What must be up before this process takes traffic: the store, and the model if it runs jobs."""
        checks = {"store": "ok" if self.jobs.ping() else "unreachable"}
        if self.settings.worker.embedded:
            checks["engine"] = self.engine.state
        if self.draining.is_set():
            checks["worker"] = "draining"
        return checks

    def drain(self) -> None:
        """Stop taking jobs and wait for the ones in hand to finish (`fluxserve worker` on SIGTERM, and every
        process as it stops): /ready answers 503 from then on; every worker stops claiming at once, then
        each finishes the job in hand."""
        self.draining.set()
        self._stop.set()  # an engine still loading starts no worker
        for worker in self.workers:
            worker.stop(timeout=0)
        for worker in self.workers:
            worker.stop()

    def stop(self) -> None:
        self.drain()  # if not done already
        self.webhook_sender.stop()
        self.deadlines.stop()
        self.advertiser.stop()  # withdraws this worker's models (after the drain: they were served till now)
        for thread in self._threads:
            thread.join(timeout=5)
        self.jobs.close()
        self.accounts.close()
        self.presence.close()

    @property
    def engine(self) -> EngineSlot:
        """This process's engine as /health and /ready see it: the one model's slot, or all of theirs summed
        up (failed if any failed, else loading if any is, else ready); `external` without a worker."""
        if not self.engines:
            return EXTERNAL
        slots = list(self.engines.values())
        if len(slots) == 1:
            return slots[0]
        states = {slot.state for slot in slots}
        state = next((s for s in ("failed", "loading") if s in states), "ready")
        failed = [f"{slug}: {slot.error}" for slug, slot in self.engines.items() if slot.error]
        ready = [slot.engine for slot in slots if slot.engine is not None]
        return EngineSlot(state=state, engine=ready[0] if ready else None, error="; ".join(failed) or None)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_and_work(self) -> None:
        # Loading a real model takes a while; the API answers (and queues jobs) meanwhile. Several models
        # load one after another, and each takes jobs as soon as it is ready.
        engines: dict[str, Engine] = {}
        moderations: dict[str, Moderation] = {}
        loaded: dict[str, Moderation] = {}  # one moderation per distinct configuration
        claimed: list[str] = []  # the workers' slugs, grown as models become ready
        for slug, slot in self.engines.items():
            if self._stop.is_set():
                return
            model = self.models[slug]
            try:
                engine = self.engine_loader(model)
                config = model.moderation.model_dump_json()
                moderation = loaded.get(config) or loaded.setdefault(config, load_moderation(model.moderation))
            except Exception as exc:
                log.exception("model %s failed to load", slug)
                slot.state, slot.error = "failed", str(exc)
                self.advertiser.renew_now()
                continue
            slot.engine, slot.state = engine, "ready"
            slot.ready.set()
            self.advertiser.renew_now()
            engines[slug], moderations[slug] = engine, moderation
            if self._stop.is_set():
                return
            claimed.append(slug)
            if self.workers:
                continue
            for _ in range(self.settings.worker.concurrency):
                worker = Worker(
                    self.jobs,
                    self.outputs,
                    engine,
                    lease_seconds=self.settings.store.lease_seconds,
                    slugs=claimed,
                    metrics=self.metrics,
                    on_finished=self.billing.settle_id,
                    previews=self.settings.worker.previews,
                    moderation=moderation,
                    engines=engines,
                    moderations=moderations,
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

    def purge_expired(self, batch: int = 500) -> int:
        """Remove the jobs past retention, each after its media: a purge whose reply was lost (and is
        re-run) loses no list of media to delete, and a job whose media could not be deleted stays for
        the next round. How many jobs are gone."""
        gone = 0
        try:
            while True:
                expired = self.jobs.expired(batch)
                deleted = [job.id for job in expired if self._delete_media(job)]
                if deleted:
                    self.jobs.purge_expired(deleted)
                    gone += len(deleted)
                if len(expired) < batch or len(deleted) < len(expired):
                    return gone
        except Exception as exc:
            _log_janitor_error("purging expired jobs", exc)
            return gone

    def _delete_media(self, job: Job) -> bool:
        if job.result is None:
            return True
        try:
            self.outputs.delete(job.result.output_key)
            return True
        except Exception as exc:
            log.warning("could not delete the image of expired job %s (%s: %s); the next round retries",
                        job.id, type(exc).__name__, exc)
            return False


def _log_janitor_error(what: str, exc: Exception) -> None:
    """A store outage is weather (one line, the next round retries); anything else is a bug (traceback)."""
    if is_transient(exc):
        log.warning("%s: the store is unavailable (%s); the next round retries", what, exc)
    else:
        log.exception("%s failed", what)
