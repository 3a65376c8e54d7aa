"""The real `segmind` SDK, unchanged, against a real server: only `base_url` points at us."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import segmind
from PIL import Image
from segmind import SegmindClient
from segmind.v2 import InferenceFailed

from conftest import SLUG

pytestmark = pytest.mark.drill

PAGE_PROMPT = (
    "Middle-aged man sitting alone at diner counter, 3am, half-eaten pie, reflection in window, "
    "fluorescent lighting casting shadows."
)
PAGE_PAYLOAD = {
    "positivePrompt": PAGE_PROMPT,
    "width": 1024,
    "height": 1024,
    "steps": 25,
    "seed": 1184522,
    "CFGScale": 7,
    "outputFormat": "JPG",
    "scheduler": "Euler",
}


@pytest.fixture()
def client(server) -> SegmindClient:
    return SegmindClient(base_url=f"{server.url}/v1", timeout=120)


@pytest.fixture()
def default_client(client, monkeypatch):
    monkeypatch.setattr(segmind, "_default_client", client)
    return client


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_page_sample_segmind_run(default_client):
    result = segmind.run(SLUG, **PAGE_PAYLOAD)
    assert result["status"] == "COMPLETED"
    assert result["metrics"]["inference_time"] > 0
    assert result["metrics"]["seed"] == 1184522
    assert result["metrics"]["queue_time"] >= 0
    media = httpx.get(result["output"], timeout=30)
    assert media.status_code == 200
    assert media.headers["content-type"] == "image/jpeg"
    image = decode(media.content)
    assert image.format == "JPEG" and image.size == (1024, 1024)


def test_page_sample_submit_async_and_wait(client):
    job = client.submit_async(SLUG, **{**PAGE_PAYLOAD, "width": 512, "height": 384, "steps": 8})
    assert job.request_id
    assert job.status_url.startswith("http://127.0.0.1:") and job.response_url.startswith("http://127.0.0.1:")
    assert job.submit_response["status"] == "QUEUED"
    assert job.submit_response["poll_url"] == job.status_url
    result = job.wait(timeout=120, interval=0.2)
    assert result["status"] == "COMPLETED"
    assert result["request_id"] == job.request_id
    assert result["metrics"]["inference_time"] > 0
    image = decode(httpx.get(result["output"], timeout=30).content)
    assert image.size == (512, 384) and image.format == "JPEG"


@pytest.mark.parametrize(
    ("fmt", "pil_format", "media_type", "size"),
    [
        ("JPG", "JPEG", "image/jpeg", (200, 136)),
        ("PNG", "PNG", "image/png", (2048, 128)),
        ("WEBP", "WEBP", "image/webp", (129, 2047)),
        ("PNG", "PNG", "image/png", (128, 128)),
    ],
)
def test_run_sync_returns_image_bytes(client, fmt, pil_format, media_type, size):
    width, height = size
    response = client.run_sync(SLUG, positivePrompt="a lighthouse at dusk", width=width, height=height,
                               steps=2, outputFormat=fmt)
    assert response.headers["content-type"] == media_type
    image = decode(response.content)
    assert image.format == pil_format
    assert image.size == (width, height)


def test_v1_base64_answer(http):
    response = http.post(f"/v1/{SLUG}", json={"positivePrompt": "a fox", "width": 256, "height": 192,
                                              "steps": 2, "outputFormat": "PNG", "base64": True})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED"
    image = decode(base64.b64decode(body["image"]))
    assert image.format == "PNG" and image.size == (256, 192)


def test_same_request_same_bytes_and_seeds_differ(client):
    params = {"positivePrompt": "a red bicycle", "width": 256, "height": 256, "steps": 4, "outputFormat": "PNG"}
    first = client.run_sync(SLUG, seed=42, **params).content
    again = client.run_sync(SLUG, seed=42, **params).content
    other = client.run_sync(SLUG, seed=43, **params).content
    assert first == again
    a, b = np.asarray(decode(first)), np.asarray(decode(other))
    assert (a != b).any(axis=-1).mean() > 0.5


def test_random_seed_is_reported_and_reproducible(client):
    params = {"positivePrompt": "a quiet harbour", "width": 128, "height": 128, "steps": 2, "outputFormat": "PNG"}
    first = client.submit_async(SLUG, seed=-1, **params).wait(timeout=60, interval=0.1)
    second = client.submit_async(SLUG, seed=-1, **params).wait(timeout=60, interval=0.1)
    seed = first["seed"]
    assert seed >= 0 and first["metrics"]["seed"] == seed
    assert seed != second["seed"]  # two draws from 2**32 seeds
    replay = client.run_sync(SLUG, seed=seed, **params)
    assert replay.content == httpx.get(first["output"], timeout=30).content


def test_failed_job_is_422_and_sdk_raises(client, http):
    job = client.submit_async(SLUG, positivePrompt="please __explode__", width=128, height=128, steps=2)
    with pytest.raises(InferenceFailed) as excinfo:
        job.wait(timeout=60, interval=0.1)
    assert "injected engine fault" in excinfo.value.detail
    for url in (job.status_url, job.response_url):
        response = httpx.get(url)
        assert response.status_code == 422
        body = response.json()
        assert body["status"] == "FAILED" and "Generation failed" in body["error"]
    v1 = http.post(f"/v1/{SLUG}", json={"positivePrompt": "__explode__ again", "width": 128, "height": 128})
    assert v1.status_code == 422 and "injected engine fault" in v1.json()["error"]
    # The server keeps serving.
    ok = client.run_sync(SLUG, positivePrompt="still alive", width=128, height=128, steps=1)
    assert decode(ok.content).size == (128, 128)
