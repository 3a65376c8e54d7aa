"""The application layer: what the service does for a caller, with no HTTP in it.

- `access`: who is calling (API key → account) and what they may see;
- `submit`: validate a generation request, admit it (rate, credits) and queue it;
- `billing`: every money move (reserve, charge, release, refund), each from one place per event;
- `control`: cancelling requests and enforcing their deadlines;
- `results`: reading a request back: its status, result, media, and waiting for it;
- `webhook_owners`: whose secret signs a job's webhooks and where they go by default.

The HTTP API (`fluxserve.api`) turns requests into these calls and `errors.DomainError`s into status
codes; the composition root (`fluxserve.services`) builds them for one process.
"""
