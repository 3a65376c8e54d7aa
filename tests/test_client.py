"""The package's Python client and `fluxserve generate --server` (a subprocess) against the real app,
in-process and listening on a loopback port."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid

import pytest
from PIL import Image

from fluxserve.client import Client, InferenceFailed, Progress

from support.app import SLUG, running_app, serve_on_loopback, shared_engine


class Served:
    def __init__(self, url: str) -> None:
        self.url = url


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """Clients that need a URL (the CLI runs in its own process) reach the app on a real port."""
    with running_app(tmp_path_factory.mktemp("client"), engine=shared_engine(tiny_model),
                     model=str(tiny_model)) as app, serve_on_loopback(app) as url:
        yield Served(url)


def test_run_reports_progress_and_returns_the_result(server):
    seen: list[Progress] = []
    with Client(server.url + "/v1") as client:  # a segmind-style base URL works too
        result = client.run(
            SLUG, positivePrompt="client progress", width=160, height=128, steps=5, on_progress=seen.append
        )
        assert result["status"] == "COMPLETED" and result["metrics"]["steps"] == 5
        image = Image.open(io.BytesIO(client.download(result["output"])))
        assert image.size == (160, 128)
    steps = [p.step for p in seen if p.step is not None]
    assert steps == sorted(steps) and steps[-1] == 5 and all(p.total == 5 for p in seen if p.step is not None)
    assert {p.request_id for p in seen} == {result["request_id"]}


def test_run_sync_submit_async_idempotency_and_cancel(server):
    with Client(server.url) as client:
        response = client.run_sync(
            SLUG, positivePrompt="client sync", width=128, height=128, steps=2, outputFormat="PNG"
        )
        assert Image.open(io.BytesIO(response.content)).format == "PNG"

        key = str(uuid.uuid4())
        first = client.submit_async(
            SLUG, idempotency_key=key, positivePrompt="client idem", steps=2, width=128, height=128
        )
        again = client.submit_async(
            SLUG, idempotency_key=key, positivePrompt="client idem", steps=2, width=128, height=128
        )
        assert again.request_id == first.request_id
        assert first.wait(timeout=120, interval=0.2)["status"] == "COMPLETED"

        doomed = client.submit_async(SLUG, positivePrompt="client cancel", width=512, height=512, steps=100)
        assert doomed.cancel()["status"] == "FAILED"
        with pytest.raises(InferenceFailed, match="cancelled"):
            doomed.wait(timeout=60, on_progress=lambda p: None)


def test_cli_generate_on_a_server_with_a_progress_bar(server, tmp_path):
    out = tmp_path / "remote.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxserve",
            "generate",
            "a remote fox",
            "-o",
            str(out),
            "--width",
            "176",
            "--height",
            "128",
            "--steps",
            "4",
            "--server",
            server.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "4/4" in run.stderr  # tqdm reached the last step
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (176, 128)
