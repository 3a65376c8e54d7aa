"""`fluxserve generate --server URL`: one request on a running server, with a live progress bar."""

from __future__ import annotations

from tqdm import tqdm

from fluxserve.client import Client, FluxserveError, Progress
from fluxserve.contract import GenerateRequest


def generate_remote(server: str, api_key: str | None, request: GenerateRequest) -> bytes:
    """Submit `request`, show its queue position and steps in a tqdm bar, and return the image bytes."""
    params = request.model_dump(exclude={"base64"})
    if not params.get("loras"):  # sent only when used, so an older server takes the request
        params.pop("loras", None)
    with Client(server, api_key=api_key) as client, tqdm(total=request.steps, unit="step") as bar:
        slug = client.health()["slug"]

        def on_progress(progress: Progress) -> None:
            if progress.status == "QUEUED":
                bar.set_description(f"queued (position {progress.queue_position})")
            elif progress.step is not None:
                bar.set_description("generating")
                bar.update(progress.step - bar.n)

        try:
            result = client.submit_async(slug, **params).wait(on_progress=on_progress)
        except FluxserveError as exc:
            raise SystemExit(f"error: {exc.detail}") from None
        bar.set_description("done")
        bar.update(request.steps - bar.n)
        return client.download(result["output"])
