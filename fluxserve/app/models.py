"""The served models, and whether each can take a job now.

A submit for a model is refused at once, instead of queueing a job that would wait forever:
- 502 (`ModelUnavailable`) when the model failed to load wherever it was tried and no live worker
  serves it (the load error says why);
- 503 (`Unavailable`) when workers are running but none of them serves the model.
A model still loading counts as served (its jobs queue meanwhile). While no worker at all is up (a
fleet starting, or every worker restarting) jobs queue as before and run once one comes back, and so
do the jobs of an `on_demand` model (its workers are scaled from zero on its queue, e.g. by KEDA). What the
fleet serves comes from the workers' adverts in the shared store (`fluxserve.presence`); this process's
own embedded worker is asked directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from fluxserve.app.errors import DomainError, ModelUnavailable, Unavailable
from fluxserve.config import Settings
from fluxserve.presence import FAILED, SERVING, FleetView, PresenceView

log = logging.getLogger(__name__)


class ModelSlot(Protocol):
    """One model of this process's own worker (the engine slot)."""

    state: str
    error: str | None


class ModelDirectory:
    def __init__(self, table: Mapping[str, Settings], local: Mapping[str, ModelSlot], fleet: PresenceView | None,
                 *, default: str, created: int, own_worker: str | None = None) -> None:
        self.table = table  # slug → that model's settings, in configuration order
        self.local = local  # the models this process's embedded worker serves
        self.fleet = fleet
        # This process's own adverts in the fleet's view: `local` says the same, and says it first (an
        # advert read a moment ago may still say `loading` for a model that has just failed).
        self.own_worker = own_worker
        self.default = default
        self.created = created  # when this process started serving them (the OpenAI listing's `created`)
        self._unreadable = False  # the adverts could not be read last time (logged once per outage)

    @property
    def slugs(self) -> list[str]:
        return list(self.table)

    def __contains__(self, slug: object) -> bool:
        return slug in self.table

    def unavailable(self, slug: str) -> DomainError | None:
        """Why a job for `slug` cannot be taken now, or None when it can (and will run, or queue)."""
        local = self.local.get(slug)
        if local is not None and local.state in SERVING:
            return None
        view = self._view(fresh=False)
        if view is not None and view.serving(slug):
            return None
        view = self._view(fresh=True)  # a refusal is decided on a read at most `min_age` old
        if view is None:  # the store cannot say: the submit itself meets the store next
            return self._failed(local, [])
        if view.serving(slug):
            return None
        failed = self._failed(local, view.errors(slug))
        if failed is not None:
            return failed
        if not view.workers and not self.local:
            return None  # no worker at all is up: the job waits for one, as any job does then
        if self.table[slug].model.on_demand:
            return None  # an autoscaler starts its workers on the queue: the job is what wakes them
        return Unavailable(
            f"No running worker serves the model {slug}: start one that does "
            f"(`fluxserve worker --models {slug}`, or FLUXSERVE_WORKER_MODELS)"
        )

    @staticmethod
    def _failed(local: ModelSlot | None, errors: list[str]) -> ModelUnavailable | None:
        if local is not None and local.state == FAILED:
            errors = [local.error or "it failed to load", *errors]
        return ModelUnavailable(f"The model is not available: {errors[0]}") if errors else None

    def state(self, slug: str, view: FleetView | None) -> str:
        """`ready`, `loading`, `failed`, `no worker` (none serves it), `queued` (no worker at all is up:
        jobs wait) or `unknown` (the store did not answer)."""
        local = self.local.get(slug)
        states = ([local.state] if local is not None else []) + (view.states(slug) if view is not None else [])
        for state in ("ready", "loading", FAILED):
            if state in states:
                return state
        if view is None:
            return "unknown"
        return "queued" if not view.workers and not self.local else "no worker"

    def listing(self) -> list[dict[str, Any]]:
        """Each model as `GET /v1/models` lists it (the parameter schema is added by the API)."""
        view = self._view(fresh=False)
        return [{"id": slug, "state": self.state(slug, view), "default": slug == self.default,
                 "pricing": {"per_image": settings.accounts.price_per_image,
                             "per_megapixel_step": settings.accounts.price_per_megapixel_step}}
                for slug, settings in self.table.items()]

    def _view(self, *, fresh: bool) -> FleetView | None:
        if self.fleet is None:
            return FleetView()
        try:
            view = (self.fleet.fresh() if fresh else self.fleet.current()).without(self.own_worker)
        except Exception as exc:
            if not self._unreadable:
                log.warning("reading the workers' model adverts failed (%s: %s); submits are admitted meanwhile",
                            type(exc).__name__, exc)
            self._unreadable = True
            return None
        self._unreadable = False
        return view
