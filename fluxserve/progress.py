"""What a worker tells the store while a job runs: step / total, percent, ETA and a small preview.

Each report is also the worker's question "should I go on?": the store refuses it once the job was
cancelled or the lease was lost, and the reporter itself cancels the job once its deadline has passed.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from fluxserve.jobs import Job, JobStore, Lease

PREVIEW_JPEG_QUALITY = 70


class ProgressReporter:
    def __init__(self, store: JobStore, lease: Lease, job: Job, total: int) -> None:
        self.store = store
        self.lease = lease
        self.job = job
        self.total = total
        self._started = time.monotonic()
        self._preview: str | None = None

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
