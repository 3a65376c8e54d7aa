"""Output media in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...), shared by the fleet.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an
instance role). With `presign_seconds` set, the API answers a media request with a redirect to a
pre-signed link instead of relaying the bytes itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from fluxserve.outputs import CHUNK_BYTES

_MISSING = ("NoSuchKey", "404", "NotFound")


class S3OutputStore:
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_seconds: int = 0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_seconds = presign_seconds
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    @classmethod
    def from_url(cls, url: str, **options) -> S3OutputStore:
        """`s3://bucket/optional/prefix`."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(bucket, prefix=prefix, **options)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes | None:
        body = self._body(key)
        return body.read() if body is not None else None

    def file_path(self, key: str) -> Path | None:
        return None

    def iter_chunks(self, key: str) -> Iterator[bytes] | None:
        body = self._body(key)
        return body.iter_chunks(CHUNK_BYTES) if body is not None else None

    def _body(self, key: str) -> Any:
        """The object's streaming body, or None when there is no such object."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def link(self, key: str) -> str | None:
        """A pre-signed GET link, or None when the API should serve the bytes itself."""
        if not self.presign_seconds:
            return None
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=self.presign_seconds
        )
