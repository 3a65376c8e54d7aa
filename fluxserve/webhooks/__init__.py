"""Webhooks: a signed POST of the result body when a request ends (and, if asked, when it starts).

A request names a `webhook` URL (or its owner has a default, see `owners`); `webhook_events_filter`
picks the events: `"completed"` (the request ended, COMPLETED or FAILED; the default) and `"start"`
(a worker picked it up). The messages are written to the job store's outbox together with the job, so
a restart drops none; `delivery.WebhookSender` signs (`signing`, Standard Webhooks) and POSTs them to
targets that pass the SSRF guard (`targets`), with bounded exponential backoff. Every attempt is
recorded and shown in the request's result.
"""

from __future__ import annotations

from fluxserve.jobs.outbox import Delivery, DeliveryTrigger, new_delivery_id

# Request-facing event names (Replicate's) → the outbox trigger that makes them due.
EVENT_TRIGGERS: dict[str, DeliveryTrigger] = {"start": "started", "completed": "finished"}
DEFAULT_EVENTS = ("completed",)


def deliveries_for(job_id: str, url: str, events: list[str] | tuple[str, ...]) -> list[Delivery]:
    return [
        Delivery(id=new_delivery_id(), job_id=job_id, url=url, trigger=EVENT_TRIGGERS[event])
        for event in dict.fromkeys(events)
    ]


def delivery_view(delivery: Delivery) -> dict:
    """How a delivery shows in the request's result."""
    event = next(name for name, trigger in EVENT_TRIGGERS.items() if trigger == delivery.trigger)
    return {"id": delivery.id, "event": event, "state": delivery.state, "attempts": delivery.attempts}
