"""The delivery loop: sender threads drain the durable outbox, sign each message and POST it.

Each sender leases one due delivery at a time from the job store, so API processes sharing a store
never send one attempt twice, and a process that dies mid-attempt leaves a lease that lapses and a
delivery that another sender picks up. A 2xx answer delivers the message; anything else (an error
status, a redirect, a timeout, a refused target) is recorded as an attempt and retried with
exponential backoff until `max_age` after the first attempt. The senders are their own threads:
a slow receiver holds one sender for at most one timeout, never a worker.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx

from fluxserve.config import WebhookSettings
from fluxserve.contract import JobState
from fluxserve.jobs import Job, JobStore
from fluxserve.jobs.outbox import Delivery, DeliveryLease, Outbox
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.store_faults import is_transient
from fluxserve.views import job_body, result_body_at
from fluxserve.webhooks.signing import signed_headers
from fluxserve.webhooks.targets import webhook_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 1.0
    max_delay: float = 120.0
    max_age: float = 900.0

    def next_attempt_at(self, attempts: list[dict[str, Any]], now: float) -> float | None:
        """When to try again after these attempts (the last one failed); None once the time is up."""
        delay = min(self.max_delay, self.first_delay * 2 ** (len(attempts) - 1))
        at = now + delay * random.uniform(1.0, 1.1)  # a little jitter, so retries do not arrive in herds
        return at if at - attempts[0]["at"] <= self.max_age else None


def webhook_payload(delivery: Delivery, job: Job, base_url: str, media_query: str = "") -> dict[str, Any]:
    """The result endpoint's body, as it was when the event happened."""
    if delivery.trigger == "started":
        return result_body_at(base_url, replace(job, state=JobState.PROCESSING), media_query)
    return job_body(base_url, job, media_query)


class WebhookSender:
    def __init__(
        self,
        jobs: JobStore,
        outbox: Outbox,
        secret_for: Callable[[str | None], str],
        media_query: Callable[[Job], str],
        config: WebhookSettings,
        *,
        default_base_url: str = "",
    ) -> None:
        self.jobs = jobs
        self.outbox = outbox
        # The `whsec_` secret that signs the webhooks of a job's owner (None: keys are off).
        self.secret_for = secret_for
        # The signed query of a job's media link, minted when the message is sent.
        self.media_query = media_query
        self.policy = RetryPolicy(config.backoff_seconds, config.max_backoff_seconds, config.max_age_seconds)
        self.senders = config.senders
        self.poll_seconds = config.poll_seconds
        self.default_base_url = default_base_url
        self.sender_id = f"webhooks-{uuid.uuid4().hex[:8]}"
        self._client = webhook_client(allow_private=config.allow_private, timeout=config.timeout_seconds)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.senders):
            thread = threading.Thread(target=self._run, name=f"webhook-sender-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        outage = False  # a store outage is logged once, when it starts, not once a second
        token: str | None = None  # kept across a claim that failed: if it took effect, the retry finds it
        while not self._stopping.is_set():
            try:
                token = token or LeasePolicy.new_token(self.sender_id)
                claimed = self.outbox.claim_delivery(self.sender_id, token=token)
                token, outage = None, False
                if claimed is None:
                    self._stopping.wait(self.poll_seconds)
                    continue
                self.deliver(*claimed)
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("webhook sender error; continuing")
                elif not outage:
                    log.warning("webhook sender: the store is unavailable (%s); retrying", exc)
                    outage = True
                self._stopping.wait(1.0)

    def deliver(self, delivery: Delivery, lease: DeliveryLease) -> None:
        job = self.jobs.get(delivery.job_id)
        now = time.time()
        if job is None:
            self.outbox.record_attempt(
                lease, {"at": now, "error": "the request expired before delivery"}, "failed"
            )
            return
        base_url = job.meta.webhook.base_url if job.meta.webhook else self.default_base_url
        body = json.dumps(webhook_payload(delivery, job, base_url, self.media_query(job))).encode()
        headers = {
            "Content-Type": "application/json",
            **signed_headers(self.secret_for(job.owner), delivery.id, body),
        }
        attempt = self._post(delivery.url, body, headers)
        attempts = [*delivery.attempts, attempt]
        if attempt.get("status_code") is not None and 200 <= attempt["status_code"] < 300:
            self.outbox.record_attempt(lease, attempt, "delivered")
            log.info("webhook %s for job %s delivered (attempt %d)", delivery.id, job.id, len(attempts))
            return
        retry_at = self.policy.next_attempt_at(attempts, time.time())
        if retry_at is None:
            self.outbox.record_attempt(lease, attempt, "failed")
            log.warning("webhook %s for job %s gave up after %d attempts", delivery.id, job.id, len(attempts))
        else:
            self.outbox.record_attempt(lease, attempt, "pending", retry_at)

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        started = time.time()
        attempt: dict[str, Any] = {"at": round(started, 3), "status_code": None}
        try:
            # Streamed and closed unread: a receiver's answer body is neither needed nor trusted.
            with self._client.stream("POST", url, content=body, headers=headers) as response:
                attempt["status_code"] = response.status_code
                if response.is_redirect:
                    attempt["error"] = "redirects are not followed"
        except httpx.HTTPError as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempt["duration"] = round(time.time() - started, 3)
        return attempt
