"""What a worker tells the store while a job runs: step / total, percent, ETA and a small preview.

Each report is also the worker's question "should I go on?": the store refuses it once the job was
cancelled or the lease was lost, and the reporter itself cancels the job once its deadline has passed.

Previews are made only while someone follows them (an SSE client with `?preview=true` keeps a marker
live in the store, `JobStore.watch_previews`): the engine asks `PreviewSink.watched()` before it copies
a latent, and the reporter asks the store at most every PREVIEW_RECHECK_SECONDS.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any

from fluxserve.jobs import Job, JobStore, Lease

log = logging.getLogger(__name__)

PREVIEW_JPEG_QUALITY = 70
# How stale the answer to "is anybody watching the previews?" may be: a store read at most twice a second.
PREVIEW_RECHECK_SECONDS = 0.5


class ProgressReporter:
    def __init__(self, store: JobStore, lease: Lease, job: Job, total: int) -> None:
        self.store = store
        self.lease = lease
        self.job = job
        self.total = total
        self._started = time.monotonic()
        self._preview: str | None = None
        self._watched = False
        self._watched_asked: float | None = None  # monotonic time of the last question to the store

    def previews_watched(self) -> bool:
        """Whether someone follows this job's previews: the store's answer, asked again once it is
        PREVIEW_RECHECK_SECONDS old. A store error counts as "no" (previews are best-effort)."""
        now = time.monotonic()
        if self._watched_asked is None or now - self._watched_asked >= PREVIEW_RECHECK_SECONDS:
            self._watched_asked = now
            try:
                self._watched = self.store.previews_watched(self.job.id)
            except Exception as exc:
                log.debug("could not ask whether job %s's previews are watched (%s: %s)", self.job.id,
                          type(exc).__name__, exc)
                self._watched = False
        if not self._watched:
            self._preview = None  # the watcher went away: reports stop carrying the last picture
        return self._watched

    def preview(self, image) -> None:
        """Keep the latest preview (a PIL image) for the next report, as a JPEG data URL."""
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
        self._preview = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def report(self, step: int, total: int | None = None) -> bool:
        """Record that `step` of `total` is done; False when the job must stop (cancelled, lease lost).

        `total` is the sampler's real count of model calls when it differs from `steps` (Heun: 2N−1)."""
        self.total = total or self.total
        deadline = self.job.meta.deadline
        if deadline is not None and deadline.passed():
            self.store.cancel(self.job.id, deadline.error)
            return False
        return self.store.report_progress(self.lease, self.snapshot(step))

    def snapshot(self, step: int) -> dict[str, Any]:
        elapsed = time.monotonic() - self._started
        progress: dict[str, Any] = {
            "step": step,
            "total": self.total,
            "percent": round(100.0 * step / self.total, 1),
            "eta_seconds": round(elapsed / step * (self.total - step), 2) if step else None,
        }
        if self._preview is not None:
            progress["preview"] = self._preview
        return progress


class PreviewSink:
    """The engine's `on_preview` for one job (see `engine.protocol.PreviewCallback`): the engine asks
    `watched()` before it makes a preview, and a preview that arrives unwatched anyway (one copied off
    the GPU just before the watcher left) is not kept."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter

    def watched(self) -> bool:
        return self.reporter.previews_watched()

    def __call__(self, image) -> None:
        if self.watched():
            self.reporter.preview(image)
