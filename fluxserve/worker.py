"""The worker: claim → generate → encode → store → complete, with the lease renewed while it runs.

It is the only thing that touches the engine. In the embedded default it is a thread of the API
process; `fluxserve worker` runs the same loop on its own.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from fluxserve.contract import EXTENSIONS, JobState
from fluxserve.encode import encode_image
from fluxserve.engine.protocol import Engine, GenerationCancelled
from fluxserve.failures import JobFailure
from fluxserve.jobs import Job, JobResult, JobStore, Lease
from fluxserve.logs import log_context
from fluxserve.metrics import Metrics
from fluxserve.moderation import Moderation
from fluxserve.outputs import OutputStore
from fluxserve.progress import ProgressReporter

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def output_key(job: Job) -> str:
    return f"{job.id}.{EXTENSIONS[job.params.outputFormat]}"


class LeaseKeeper:
    """Renews a lease in the background; `lost` is set once the store says it is no longer ours."""

    def __init__(self, store: JobStore, lease: Lease, interval: float,
                 on_renewed: Callable[[], None] | None = None) -> None:
        self.store = store
        self.lease = lease
        self.interval = interval
        self.on_renewed = on_renewed or (lambda: None)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.store.heartbeat(self.lease):
                    log.warning("lease on job %s was lost; abandoning it", self.lease.job_id)
                    self.lost.set()
                    return
                self.on_renewed()
            except Exception:  # a store hiccup: keep trying until the lease itself lapses
                log.exception("heartbeat for job %s failed", self.lease.job_id)


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
    ) -> None:
        self.store = store
        self.outputs = outputs
        self.engine = engine
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
        while not self._stopping.is_set():
            self.metrics.heartbeat(self.worker_id)
            try:
                if not self.run_once():
                    self.store.wait_for_work(self.slugs, self.idle_poll_seconds)
            except Exception:
                log.exception("worker loop error; continuing")
                self._stopping.wait(1.0)
        log.info("worker %s stopped", self.worker_id)

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        claimed = self.store.claim(self.worker_id, self.slugs)
        if claimed is None:
            return False
        with log_context(job_id=claimed[0].id, worker=self.worker_id):
            self.process(*claimed)
        return True

    # -- one job -------------------------------------------------------------------------------

    def process(self, job: Job, lease: Lease) -> None:
        log.info("job %s claimed (attempt %d)", job.id, job.attempts)
        renewed = functools.partial(self.metrics.heartbeat, self.worker_id)
        with LeaseKeeper(self.store, lease, interval=self.lease_seconds / 3, on_renewed=renewed) as keeper:
            try:
                result = self._generate(job, keeper)
            except GenerationCancelled:
                # Cancelled (the API already ended it FAILED) or the lease is gone (another worker owns it).
                self.metrics.job_ended("abandoned")
                return
            except JobFailure as exc:  # blocked content, out of memory, NaN: the message is for the client
                log.warning("job %s failed: %s", job.id, exc)
                self._fail(lease, str(exc))
                return
            except Exception as exc:
                log.exception("job %s failed", job.id)
                self._fail(lease, f"Generation failed: {type(exc).__name__}: {exc}")
                return
        if not self.store.complete(lease, result):
            log.warning("job %s finished after its lease was lost; result discarded", job.id)
            self.metrics.job_ended("abandoned")
            current = self.store.get(job.id)
            if current is not None and current.state is JobState.FAILED:  # cancelled at the last moment
                self.outputs.delete(result.output_key)
            return
        self.metrics.job_completed(result.metrics)
        self._finished(job.id)
        log.info("job %s completed in %.2fs", job.id, result.metrics["inference_time"])

    def _fail(self, lease: Lease, error: str) -> None:
        if self.store.fail(lease, error):
            self.metrics.job_ended("FAILED")
            self._finished(lease.job_id)

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
            if keeper.lost.is_set() or not progress.report(step, total):
                log.info("job %s stopped at step %d of %d (cancelled, or lease lost)", job.id, step, total)
                raise GenerationCancelled()

        on_step(0, params.steps)  # a job cancelled (or past its deadline) while queued stops here
        self.moderation.check_prompt(params.prompt)
        started = time.perf_counter()
        on_preview = progress.preview if self.previews else None
        image = self.engine.generate(params, on_step=on_step, on_preview=on_preview)
        inference_time = time.perf_counter() - started
        self.moderation.check_image(image)

        started = time.perf_counter()
        data, media_type = encode_image(image, request.outputFormat)
        key = output_key(job)
        self.outputs.put(key, data)
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
                **self.engine.metrics(),
            },
        )
