"""One conformance suite for the output (media) stores: local dir, Redis, and S3 (moto's real server)."""

from __future__ import annotations

import os
import uuid

import boto3
import httpx
import pytest

from fluxserve.outputs.local import LocalOutputStore

from support.app import SLUG, running_app, shared_engine, wait_status
from support.processes import free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto in server mode: a real S3-compatible HTTP endpoint on loopback."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def make_bucket(endpoint: str) -> str:
    bucket = f"media-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=bucket)
    return bucket


def _credentials() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(params=["local", "redis", "s3"])
def outputs(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalOutputStore(tmp_path / "outputs")
    if request.param == "redis":
        from fluxserve.outputs.redis import RedisOutputStore

        return RedisOutputStore.from_url(request.getfixturevalue("redis_url"), prefix=f"test-{uuid.uuid4().hex[:12]}",
                                         ttl_seconds=60)
    from fluxserve.outputs.s3 import S3OutputStore

    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3OutputStore(make_bucket(endpoint), prefix="outputs", endpoint_url=endpoint)


def test_put_get_delete(outputs):
    data = os.urandom(70_000)
    outputs.put("job-1.png", data)
    assert outputs.get("job-1.png") == data
    outputs.put("job-1.png", b"replaced")  # a reclaimed job stores its (identical) image again
    assert outputs.get("job-1.png") == b"replaced"
    outputs.delete("job-1.png")
    assert outputs.get("job-1.png") is None
    outputs.delete("job-1.png")  # deleting twice is harmless (two janitors)


def test_missing_key(outputs):
    assert outputs.get("never-stored.jpg") is None


def test_media_served_as_presigned_s3_links(tmp_path, tiny_model, s3_endpoint, monkeypatch):
    """A server whose outputs live in S3 answers the media URL with a redirect to a pre-signed link."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = make_bucket(s3_endpoint)
    with running_app(tmp_path / "data", engine=shared_engine(tiny_model), model=str(tiny_model),
                     output_store=f"s3://{bucket}/media", s3_endpoint_url=s3_endpoint,
                     s3_presign_seconds=300) as server, server.http() as http:
        job_id = http.post(f"/v2/{SLUG}", json={"positivePrompt": "to the bucket", "width": 128, "height": 128,
                                                "steps": 2, "outputFormat": "PNG"}).json()["request_id"]
        assert wait_status(http, job_id)["status"] == "COMPLETED"
        output = http.get(f"/v2/requests/{job_id}").json()["output"]
        redirect = http.get(httpx.URL(output).path)
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_endpoint)
        image = httpx.get(redirect.headers["location"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        stored = boto3.client("s3", endpoint_url=s3_endpoint, **_credentials()).get_object(
            Bucket=bucket, Key=f"media/{job_id}.png")["Body"].read()
        assert stored == image.content
