"""One conformance suite for the output (media) stores: local dir, Redis, PostgreSQL and S3 (moto's real
server); and a local write that fails for real (a full filesystem) leaves nothing behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import boto3
import httpx
import pytest

from fluxserve.outputs import CHUNK_BYTES
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


@pytest.fixture(params=["local", "redis", "postgres", "s3"])
def outputs(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield LocalOutputStore(tmp_path / "outputs")
    elif request.param == "redis":
        from fluxserve.outputs.redis import RedisOutputStore

        yield RedisOutputStore.from_url(request.getfixturevalue("redis_url"), prefix=f"test-{uuid.uuid4().hex[:12]}",
                                        ttl_seconds=60)
    elif request.param == "postgres":
        from fluxserve.outputs.postgres import PostgresOutputStore

        store = PostgresOutputStore.from_url(request.getfixturevalue("postgres_url"))
        yield store
        store.close()
    else:
        from fluxserve.outputs.s3 import S3OutputStore

        for name, value in S3_ENV.items():
            monkeypatch.setenv(name, value)
        endpoint = request.getfixturevalue("s3_endpoint")
        yield S3OutputStore(make_bucket(endpoint), prefix="outputs", endpoint_url=endpoint)


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
    assert outputs.iter_chunks("never-stored.jpg") is None


def test_streamed_in_chunks(outputs):
    """What the API relays is the stored bytes, a chunk of at most CHUNK_BYTES at a time."""
    data = os.urandom(2 * CHUNK_BYTES + 12_345)
    outputs.put("job-2.jpg", data)
    chunks = outputs.iter_chunks("job-2.jpg")
    assert chunks is not None
    pieces = list(chunks)
    assert b"".join(pieces) == data
    assert len(pieces) >= 3 and all(len(piece) <= CHUNK_BYTES for piece in pieces)


def test_served_by_the_api_unless_the_store_says_otherwise(outputs):
    """Only the local store has a file to send; only S3 with pre-signing hands out links."""
    outputs.put("job-3.webp", b"RIFF....WEBP")
    path = outputs.file_path("job-3.webp")
    if isinstance(outputs, LocalOutputStore):
        assert path is not None and path.read_bytes() == b"RIFF....WEBP"
    else:
        assert path is None
    assert outputs.link("job-3.webp") is None  # none of these stores pre-signs


def test_postgres_media_shared_across_processes_and_migrated_once(postgres_url):
    """Two stores on one URL (an API replica and a worker) see one table: the second start migrates nothing;
    a chunked read of media deleted under it stops instead of failing."""
    from fluxserve.outputs.postgres import COMPONENT, SCHEMA, PostgresOutputStore
    from fluxserve.pgdb import migrate

    worker, api = PostgresOutputStore.from_url(postgres_url), PostgresOutputStore.from_url(postgres_url)
    try:
        assert migrate(api.pool, COMPONENT, SCHEMA) == []
        data = os.urandom(3 * CHUNK_BYTES)
        worker.put("job-4.png", data)
        assert api.get("job-4.png") == data
        chunks = api.iter_chunks("job-4.png")
        assert chunks is not None
        assert next(chunks) == data[:CHUNK_BYTES]
        worker.delete("job-4.png")
        assert list(chunks) == []
    finally:
        worker.close()
        api.close()


def test_postgres_expired_media_swept(postgres_url):
    """With a TTL, media older than it are deleted (the safety net for when no janitor runs)."""
    from fluxserve.outputs.postgres import PostgresOutputStore

    store = PostgresOutputStore.from_url(postgres_url, ttl_seconds=60)
    try:
        store.put("old.png", b"old")
        store.put("new.png", b"new")
        with store.pool.connection() as conn:
            conn.execute("UPDATE media SET created_at = created_at - interval '2 minutes' WHERE key = 'old.png'")
        assert store.sweep_expired() == 1
        assert store.get("old.png") is None and store.get("new.png") == b"new"
    finally:
        store.close()


@pytest.fixture()
def full_disk(tmp_path):
    """A real filesystem with 64 KiB of room: a tmpfs mounted for the test (root only)."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tiny tmpfs needs root and mount(8): the real full-disk case cannot run here")
    root = tmp_path / "tiny"
    root.mkdir(mode=0o700)
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k,mode=700", "tmpfs", str(root)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip() or done.returncode})")
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_failed_local_write_leaves_nothing(full_disk: Path):
    """A write that runs out of space raises the filesystem's own error and leaves neither a temp file
    nor a partial file; the image already stored under the key is still whole."""
    store = LocalOutputStore(full_disk)
    store.put("job-5.png", b"the first image")
    with pytest.raises(OSError) as failure:
        store.put("job-5.png", os.urandom(1024 * 1024))
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as failure:
        store.put("job-6.png", os.urandom(1024 * 1024))
    assert failure.value.errno == errno.ENOSPC
    assert sorted(os.listdir(full_disk)) == ["job-5.png"]
    assert store.get("job-5.png") == b"the first image"
    assert store.get("job-6.png") is None and store.file_path("job-6.png") is None
    store.put("job-7.png", b"small enough")  # the space the failures took was given back
    assert store.get("job-7.png") == b"small enough"


def test_failed_local_write_mid_file_leaves_nothing(tmp_path, monkeypatch):
    """The same on any filesystem: the second write of a large image fails (EIO, as a dying disk gives),
    after the first part reached the temp file."""
    store = LocalOutputStore(tmp_path / "outputs")
    real_write, calls = os.write, []

    def failing_write(fd: int, data) -> int:
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, bytes(data[:4096]))  # a short write: put must go on from there

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError) as failure:
        store.put("job-8.png", b"x" * 10_000)
    monkeypatch.undo()
    assert failure.value.errno == errno.EIO and len(calls) == 2
    assert os.listdir(tmp_path / "outputs") == []


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
