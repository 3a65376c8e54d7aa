"""The worker: claim → generate → encode → store → complete, with the lease renewed while it runs.

It is the only thing that touches the engine. In the embedded default it is a thread of the API
process; `fluxserve worker` runs the same loop on its own.

A store fault is never a job fault (`fluxserve.store_faults`). A store call made for a job (heartbeat,
progress, the output, complete, fail) that meets a transient error is retried with backoff while the
job's lease may still be valid; if it still cannot be made, the job is abandoned (logged) and the
queue hands it out again once the lease lapses: it is never marked FAILED for it. A heartbeat that
cannot reach the store within the lease stops the job's work, so two workers never compute it side by
side. The claim loop rides out an outage: it logs once, backs off and keeps claiming (a claim that
failed is retried under the same token). The generation itself failing is still the job's failure.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TypeVar

from fluxserve.contract import EXTENSIONS, JobState
from fluxserve.encode import encode_image
from fluxserve.engine.protocol import Engine, GenerationCancelled
from fluxserve.failures import JobFailure
from fluxserve.jobs import Job, JobResult, JobStore, Lease
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.logs import log_context
from fluxserve.metrics import Metrics
from fluxserve.moderation import Moderation
from fluxserve.outputs import OutputStore
from fluxserve.progress import PreviewSink, ProgressReporter
from fluxserve.store_faults import is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

# A store call that met a transient fault is retried 0.1 s later, then 0.2 s, ... at most 2 s apart.
RETRY_FIRST_SECONDS = 0.1
RETRY_CAP_SECONDS = 2.0
# One call's retries end here even while heartbeats keep its lease alive (an output store full for long).
RETRY_CEILING_SECONDS = 300.0
# The claim loop's backoff while the store is unreachable.
OUTAGE_BACKOFF_CAP_SECONDS = 5.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def output_key(job: Job) -> str:
    return f"{job.id}.{EXTENSIONS[job.params.outputFormat]}"


class StoreLost(GenerationCancelled):
    """A store call the job needed could not be made while its lease lasted: the job is abandoned, left
    for the queue to hand out again, never failed for it. A GenerationCancelled, so raising it from an
    engine's step callback stops the run."""


def call_store(call: Callable[[], T], *, until: Callable[[], float], what: str,
               stop: threading.Event | None = None) -> T:
    """`call()`; a transient store error is retried with backoff while `time.monotonic() < until()`
    (and `stop` is not set), then raised as StoreLost. Any other error is raised as it is."""
    delay = RETRY_FIRST_SECONDS
    retries = 0
    ceiling = time.monotonic() + RETRY_CEILING_SECONDS
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            remaining = min(until(), ceiling) - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                raise StoreLost(f"{what}: the store could not be reached ({type(exc).__name__}: {exc})") from exc
            if retries == 0:
                log.warning("%s failed (%s: %s); retrying while the lease lasts", what, type(exc).__name__, exc)
            retries += 1
            pause = min(delay, remaining)
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
            delay = min(delay * 2, RETRY_CAP_SECONDS)
            continue
        if retries:
            log.info("%s went through after %d retr%s", what, retries, "y" if retries == 1 else "ies")
        return result


class LeaseKeeper:
    """Renews a lease in the background. `valid_until` (monotonic) is when the lease surely still holds
    (the last renewal sent, plus the lease); `lost` is set once the store says the lease is no longer
    ours, or could not be reached before `valid_until`: the job's work stops, another worker reclaims it."""

    def __init__(self, store: JobStore, lease: Lease, interval: float,
                 on_renewed: Callable[[], None] | None = None, *, lease_seconds: float | None = None,
                 valid_from: float | None = None) -> None:
        self.store = store
        self.lease = lease
        self.interval = interval
        self.on_renewed = on_renewed or (lambda: None)
        self.lease_seconds = lease_seconds if lease_seconds is not None else interval * 3
        # From when the claim was sent: the store started the lease no earlier.
        self.valid_until = (valid_from if valid_from is not None else time.monotonic()) + self.lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def expired(self) -> bool:
        """The lease is lost, or may have lapsed (no renewal went through in time): stop the work now,
        even while a heartbeat is still being retried, so two workers never compute the job."""
        return self.lost.is_set() or time.monotonic() >= self.valid_until

    def deadline(self) -> float:
        """Until when a store call for the job is worth retrying: never once the lease is lost."""
        return float("-inf") if self.lost.is_set() else self.valid_until

    def _run(self) -> None:
        job_id = self.lease.job_id
        while not self._stop.wait(self.interval):
            sent = time.monotonic()
            try:
                ours = call_store(lambda: self.store.heartbeat(self.lease), until=lambda: self.valid_until,
                                  what=f"heartbeat for job {job_id}", stop=self._stop)
            except StoreLost as exc:
                if not self._stop.is_set():
                    log.warning("%s before its lease ran out; stopping job %s (the queue will hand it out again)",
                                exc, job_id)
                    self.lost.set()
                return
            except Exception:  # not a passing fault: keep trying until the lease itself lapses
                log.exception("heartbeat for job %s failed", job_id)
                if time.monotonic() >= self.valid_until:
                    log.warning("no heartbeat for job %s went through within its lease; stopping it", job_id)
                    self.lost.set()
                    return
                continue
            if not ours:
                log.warning("lease on job %s was lost; abandoning it", job_id)
                self.lost.set()
                return
            self.valid_until = sent + self.lease_seconds
            self.on_renewed()


def _accepts_token(claim: Callable[..., object]) -> bool:
    """Whether the store's `claim` takes a caller's token (a claim retried under it is not taken twice)."""
    try:
        return "token" in inspect.signature(claim).parameters
    except (TypeError, ValueError):
        return False


class Worker:
    def __init__(
        self,
        store: JobStore,
        outputs: OutputStore,
        engine: Engine,
        *,
        lease_seconds: float,
        slugs: list[str] | None = None,
        idle_poll_seconds: float = 0.2,
        worker_id: str | None = None,
        on_finished: Callable[[str], object] | None = None,
        previews: bool = True,
        metrics: Metrics | None = None,
        moderation: Moderation | None = None,
        engines: Mapping[str, Engine] | None = None,
        moderations: Mapping[str, Moderation] | None = None,
    ) -> None:
        self.store = store
        self.outputs = outputs
        self.engine = engine
        # Several models in one worker: a job runs on its slug's engine and moderation (else the defaults).
        self.engines = engines or {}
        self.moderations = moderations or {}
        self.lease_seconds = lease_seconds
        self.slugs = slugs
        self.idle_poll_seconds = idle_poll_seconds
        self.worker_id = worker_id or new_worker_id()
        # Called with the job id once the job is COMPLETED or FAILED (credits are settled there).
        self.on_finished = on_finished
        self.previews = previews
        self.metrics = metrics or Metrics()
        self.moderation = moderation or Moderation()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The token of the claim in hand: kept when a claim fails, so its retry cannot lease a second job.
        self._claim_token: str | None = None
        self._claim_takes_token = _accepts_token(store.claim)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; the job in hand (if any) runs to its end first."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        log.info("worker %s started", self.worker_id)
        outage_since: float | None = None
        backoff = RETRY_FIRST_SECONDS
        while not self._stopping.is_set():
            self.metrics.heartbeat(self.worker_id)
            try:
                if not self.run_once():
                    self.store.wait_for_work(self.slugs, self.idle_poll_seconds)
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("worker loop error; continuing")
                    self._stopping.wait(1.0)
                    continue
                if outage_since is None:  # once per outage
                    outage_since = time.monotonic()
                    log.warning("the job store is unavailable (%s: %s); worker %s keeps trying",
                                type(exc).__name__, exc, self.worker_id)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, OUTAGE_BACKOFF_CAP_SECONDS)
                continue
            if outage_since is not None:
                log.warning("the job store is available again after %.1fs; worker %s is claiming",
                            time.monotonic() - outage_since, self.worker_id)
                outage_since, backoff = None, RETRY_FIRST_SECONDS
        log.info("worker %s stopped", self.worker_id)

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        if self._claim_token is None:
            self._claim_token = LeasePolicy.new_token(self.worker_id)
        asked = time.monotonic()
        claimed = self._claim(self._claim_token)  # when this raises, the retry reuses the token
        self._claim_token = None
        if claimed is None:
            return False
        with log_context(job_id=claimed[0].id, worker=self.worker_id):
            self.process(*claimed, claimed_at=asked)
        return True

    def _claim(self, token: str) -> tuple[Job, Lease] | None:
        if self._claim_takes_token:
            return self.store.claim(self.worker_id, self.slugs, token=token)
        return self.store.claim(self.worker_id, self.slugs)

    # -- one job -------------------------------------------------------------------------------

    def process(self, job: Job, lease: Lease, claimed_at: float | None = None) -> None:
        log.info("job %s claimed (attempt %d)", job.id, job.attempts)
        renewed = functools.partial(self.metrics.heartbeat, self.worker_id)
        keeper = LeaseKeeper(self.store, lease, interval=self.lease_seconds / 3, on_renewed=renewed,
                             lease_seconds=self.lease_seconds, valid_from=claimed_at)
        with keeper:
            try:
                result = self._generate(job, keeper)
            except StoreLost as exc:
                self._abandon(job.id, str(exc))
                return
            except GenerationCancelled:
                # Cancelled (the API already ended it FAILED) or the lease is gone (another worker owns it).
                self.metrics.job_ended("abandoned")
                return
            except JobFailure as exc:  # blocked content, out of memory, NaN: the message is for the client
                log.warning("job %s failed: %s", job.id, exc)
                self._fail(keeper, str(exc))
                return
            except Exception as exc:
                log.exception("job %s failed", job.id)
                self._fail(keeper, f"Generation failed: {type(exc).__name__}: {exc}")
                return
        try:
            done = self._for_job(lambda: self.store.complete(lease, result), keeper,
                                 f"recording the result of job {job.id}")
        except StoreLost as exc:
            self._abandon(job.id, str(exc))
            return
        if not done:
            log.warning("job %s finished after its lease was lost; result discarded", job.id)
            self.metrics.job_ended("abandoned")
            current = self._get_quietly(job.id)
            if current is not None and current.state is JobState.FAILED:  # cancelled at the last moment
                try:
                    self.outputs.delete(result.output_key)
                except Exception as exc:  # left for the janitor's purge of the expired job
                    log.warning("could not delete the image of cancelled job %s (%s: %s)", job.id,
                                type(exc).__name__, exc)
            return
        self.metrics.job_completed(result.metrics)
        self._finished(job.id)
        log.info("job %s completed in %.2fs", job.id, result.metrics["inference_time"])

    def _for_job(self, call: Callable[[], T], keeper: LeaseKeeper, what: str) -> T:
        """A store call for the job: retried while its lease lasts. Whatever still fails (even a fault
        that is not transient) is StoreLost: the job is abandoned, not failed."""
        try:
            return call_store(call, until=keeper.deadline, what=what)
        except StoreLost:
            raise
        except Exception as exc:
            log.exception("%s failed", what)
            raise StoreLost(f"{what} failed ({type(exc).__name__}: {exc})") from exc

    def _abandon(self, job_id: str, why: str) -> None:
        log.warning("job %s abandoned: %s; the queue will hand it out again once its lease lapses", job_id, why)
        self.metrics.job_ended("abandoned")

    def _get_quietly(self, job_id: str) -> Job | None:
        try:
            return self.store.get(job_id)
        except Exception as exc:
            log.warning("could not read job %s back (%s: %s)", job_id, type(exc).__name__, exc)
            return None

    def _fail(self, keeper: LeaseKeeper, error: str) -> None:
        job_id = keeper.lease.job_id
        try:
            failed = self._for_job(lambda: self.store.fail(keeper.lease, error), keeper,
                                   f"recording the failure of job {job_id}")
        except StoreLost as exc:
            self._abandon(job_id, str(exc))
            return
        if failed:
            self.metrics.job_ended("FAILED")
            self._finished(job_id)

    def _finished(self, job_id: str) -> None:
        if self.on_finished is None:
            return
        try:
            self.on_finished(job_id)
        except Exception:  # the janitor's sweep settles it later
            log.exception("after-finish hook for job %s failed", job_id)

    def _generate(self, job: Job, keeper: LeaseKeeper) -> JobResult:
        request = job.params
        params = request.generation_params()
        progress = ProgressReporter(self.store, keeper.lease, job, total=params.steps)

        def on_step(step: int, total: int) -> None:
            # Each report also asks "go on?"; one the store cannot take while the lease lasts stops the job.
            if keeper.expired() or not self._for_job(lambda: progress.report(step, total), keeper,
                                                         f"progress report of job {job.id}"):
                log.info("job %s stopped at step %d of %d (cancelled, or lease lost)", job.id, step, total)
                raise GenerationCancelled()

        on_step(0, params.steps)  # a job cancelled (or past its deadline) while queued stops here
        engine = self.engines.get(job.slug, self.engine)
        moderation = self.moderations.get(job.slug, self.moderation)
        moderation.check_prompt(params.prompt)
        started = time.perf_counter()
        # Previews only while someone follows them (the sink asks the store, at most twice a second).
        on_preview = PreviewSink(progress) if self.previews else None
        image = engine.generate(params, on_step=on_step, on_preview=on_preview)
        inference_time = time.perf_counter() - started
        moderation.check_image(image)

        started = time.perf_counter()
        data, media_type = encode_image(image, request.outputFormat)
        key = output_key(job)
        self._for_job(lambda: self.outputs.put(key, data), keeper, f"storing the image of job {job.id}")
        encode_time = time.perf_counter() - started

        return JobResult(
            output_key=key,
            media_type=media_type,
            metrics={
                "inference_time": round(inference_time, 4),
                "encode_time": round(encode_time, 4),
                "queue_time": round(max(0.0, (job.started_at or job.created_at) - job.created_at), 4),
                "seed": request.seed,
                "width": request.width,
                "height": request.height,
                "steps": request.steps,
                "scheduler": request.scheduler,
                "attempts": job.attempts,
                "bytes": len(data),
                **engine.metrics(),
            },
        )
