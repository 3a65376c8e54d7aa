"""Prometheus metrics of one process (API replica, worker, or both in the embedded default).

Each process has its own registry: the API exports the queue depth per state (read from the shared
store at scrape time, so every replica shows the fleet's queue); the process that runs jobs exports
their latencies, outcomes and its workers' heartbeats. Sum the counters across processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fluxserve.contract import JobState

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from sub-second (tiny model, warm GPU) to a long queue or a big image on a slow card.
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_wait = Histogram(
            "fluxserve_job_queue_wait_seconds", "Time from submit to the claim that ran the job",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inference = Histogram(
            "fluxserve_job_inference_seconds", "Engine time per completed job",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.encode = Histogram(
            "fluxserve_job_encode_seconds", "Encode + store time per completed job",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.lora = Histogram(
            "fluxserve_job_lora_seconds", "Per-request LoRA time per completed job: loading an adapter, "
            "switching the active set", ["phase"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.finished = Counter(
            "fluxserve_jobs_finished", "Jobs this process ended, by final state (lost = lease lost mid-job)",
            ["state"], registry=self.registry,
        )
        self.heartbeats = Counter(
            "fluxserve_worker_heartbeats", "Lease renewals and idle polls, per worker",
            ["worker"], registry=self.registry,
        )
        self.last_heartbeat = Gauge(
            "fluxserve_worker_last_heartbeat_timestamp_seconds", "When each worker last showed it was alive",
            ["worker"], registry=self.registry,
        )
        for state in (JobState.COMPLETED.value, JobState.FAILED.value, "abandoned"):
            self.finished.labels(state)

    def watch_store(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        """Export the shared queue's depth per state, read when scraped."""
        self.registry.register(_QueueDepth(count_by_state))

    def job_completed(self, metrics: dict[str, Any]) -> None:
        """A completed job's own metrics (its result's)."""
        self.queue_wait.observe(metrics["queue_time"])
        self.inference.observe(metrics["inference_time"])
        self.encode.observe(metrics["encode_time"])
        for phase in ("load", "swap"):
            if f"lora_{phase}_seconds" in metrics:
                self.lora.labels(phase).observe(metrics[f"lora_{phase}_seconds"])
        self.finished.labels(JobState.COMPLETED.value).inc()

    def job_ended(self, state: str) -> None:
        self.finished.labels(state).inc()

    def heartbeat(self, worker_id: str) -> None:
        self.heartbeats.labels(worker_id).inc()
        self.last_heartbeat.labels(worker_id).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueDepth(Collector):
    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self.count_by_state = count_by_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("fluxserve_jobs", "Jobs in the store by state (ended ones until they expire)",
                                   labels=["state"])
        try:
            counts = self.count_by_state()
        except Exception:  # an unreachable store must not break the scrape of everything else
            log.warning("could not read the queue depth from the store", exc_info=True)
            return
        for state in JobState:
            family.add_metric([state.value], counts.get(state.value, 0))
        yield family
