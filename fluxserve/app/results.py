"""Reading a request back: its record (for its owner only), queue position, result body, media,
webhook deliveries, and waiting for it to end (v1's synchronous call)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxserve.app.access import Access, Caller
from fluxserve.app.billing import Billing
from fluxserve.app.errors import NotFound, StillRunning
from fluxserve.contract import JobState
from fluxserve.jobs import Job, JobStore
from fluxserve.jobs.outbox import Outbox
from fluxserve.outputs import OutputStore
from fluxserve.views import job_body, status_body
from fluxserve.webhooks import delivery_view


@dataclass(frozen=True)
class Media:
    """Where a job's image is, so the API can stream it: never read whole into memory."""

    media_type: str
    link: str | None = None  # a pre-signed link to redirect to, or
    path: Path | None = None  # a local file (served with ranges), or
    chunks: Iterator[bytes] | None = None  # the bytes, a chunk at a time


class Results:
    def __init__(self, jobs: JobStore, outbox: Outbox, outputs: OutputStore, access: Access,
                 billing: Billing) -> None:
        self.jobs = jobs
        self.outbox = outbox
        self.outputs = outputs
        self.access = access
        self.billing = billing

    def find(self, caller: Caller, job_id: str) -> Job:
        """The job, if the caller may see it."""
        job = self._live(job_id)
        self.access.authorize_job(caller, job)
        return job

    def _live(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"Request {job_id} not found (unknown or expired)")
        return job

    def status(self, job: Job, *, preview: bool = False) -> dict[str, Any]:
        """The status body of a job that has not ended (with its queue position while QUEUED)."""
        position = self.jobs.queue_position(job.id) if job.state is JobState.QUEUED else None
        return status_body(job, position, preview=preview)

    def body(self, job: Job, base_url: str) -> dict[str, Any]:
        """What `GET /v2/requests/{id}` answers (FAILED included), its media link signed when the job was
        made with a key."""
        return job_body(base_url, job, self.access.media_query(job))

    def webhook_section(self, job: Job) -> dict[str, Any]:
        """The request's webhook and every delivery attempt so far (nothing when it has no webhook)."""
        if job.meta.webhook is None:
            return {}
        views = [delivery_view(delivery) for delivery in self.outbox.deliveries(job.id)]
        return {"webhook": {"url": job.meta.webhook.url, "deliveries": views}}

    def wait(self, job: Job, timeout: float, status_url: str) -> tuple[Job, bytes | None]:
        """Wait for the job to end, settle it (so the balance is final when v1 answers), and return it
        with its image bytes when COMPLETED; StillRunning when `timeout` passes first."""
        done = self.jobs.wait_terminal(job.id, timeout)
        if done is None:
            raise NotFound(f"Request {job.id} expired before it finished")
        if not done.state.terminal:
            raise StillRunning(
                f"The request did not finish within {timeout:g}s; it is still running as request {job.id}: "
                f"poll {status_url}"
            )
        self.billing.settle(done)
        if done.state is JobState.FAILED or done.result is None:
            return done, None
        data = self.outputs.get(done.result.output_key)
        if data is None:
            raise NotFound(f"Output of request {job.id} is no longer available")
        return done, data

    def media(self, output_key: str, query: Mapping[str, str], caller: Callable[[], Caller]) -> Media:
        """A job's image by its key: for whoever holds a live signed link, else for the job's owner."""
        job_id = output_key.partition(".")[0]
        signed = self.access.check_media_link(job_id, query)
        job = self._live(job_id) if signed else self.find(caller(), job_id)
        if job.result is None or job.result.output_key != output_key:
            raise NotFound("Media not found")
        media_type = job.result.media_type
        link = self.outputs.link(output_key)
        if link:
            return Media(media_type, link=link)
        path = self.outputs.file_path(output_key)
        if path is not None:
            return Media(media_type, path=path)
        chunks = self.outputs.iter_chunks(output_key)
        if chunks is None:
            raise NotFound("Media not found")
        return Media(media_type, chunks=chunks)
