"""What a job looks like to clients: the result, status and webhook bodies.

They take the public base URL explicitly, so code with no HTTP request at hand (webhook delivery)
builds exactly the body the result endpoint serves.
"""

from __future__ import annotations

from typing import Any

from fluxserve.contract import JobState
from fluxserve.jobs import Job


def media_url_at(base: str, output_key: str, media_query: str = "") -> str:
    """`media_query` is the `?sig=...` that lets the link work without an API key (empty when auth is off)."""
    return f"{base}/v2/media/{output_key}{media_query}"


def failed_body(job: Job) -> dict[str, Any]:
    return {"request_id": job.id, "status": JobState.FAILED.value, "error": job.error}


def result_body_at(base: str, job: Job, media_query: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
    if job.state is not JobState.COMPLETED or job.result is None:
        return {**body, "output": None, "metrics": {}}
    return {
        **body,
        "output": media_url_at(base, job.result.output_key, media_query),
        "seed": job.params.seed,
        "outputFormat": job.params.outputFormat,
        "metrics": {
            **job.result.metrics,
            "total_time": round((job.finished_at or job.created_at) - job.created_at, 4),
            "cost": job.meta.cost or 0,
        },
        "created_at": job.created_at,
        "completed_at": job.finished_at,
    }


def job_body(base: str, job: Job, media_query: str = "") -> dict[str, Any]:
    """What `GET /v2/requests/{id}` answers for the job (FAILED included)."""
    return failed_body(job) if job.state is JobState.FAILED else result_body_at(base, job, media_query)


def public_progress(progress: dict[str, Any], *, preview: bool = False) -> dict[str, Any]:
    """The worker's progress report as clients see it; the preview image only when asked for."""
    if preview:
        return dict(progress)
    return {name: value for name, value in progress.items() if name != "preview"}


def status_body(job: Job, queue_position: int | None = None, *, preview: bool = False) -> dict[str, Any]:
    """What `GET /v2/requests/{id}/status` answers for a job that has not ended."""
    body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
    if job.state is JobState.QUEUED:
        body["queue_position"] = queue_position
    if job.state is JobState.PROCESSING and job.progress:
        body["progress"] = public_progress(job.progress, preview=preview)
    return body
