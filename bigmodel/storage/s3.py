"""S3-compatible storage through boto3 (AWS, MinIO, moto's server).

Credentials come from the standard AWS chain; `BIGMODEL_S3_ENDPOINT_URL` points at a non-AWS
endpoint. Missing objects are permanent errors; throttling, 5xx and connection errors are
retryable.
"""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from bigmodel.core.errors import OBJECT_NOT_FOUND, OBJECT_TOO_LARGE, PermanentError, RetryableError
from bigmodel.storage.base import Storage, parse_s3_uri

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


def make_client(endpoint_url: str | None):
    cfg = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=32,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=cfg)


def translate(exc: Exception, what: str) -> Exception:
    """Map a boto error to ours: missing -> permanent, the rest -> retryable."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            return PermanentError(OBJECT_NOT_FOUND, f"{what} does not exist")
        if code in {"AccessDenied", "403", "InvalidBucketName"}:
            return PermanentError(OBJECT_NOT_FOUND, f"{what}: access denied ({code})")
        return RetryableError(f"{what}: S3 error {code}", delay_s=2.0)
    return RetryableError(f"{what}: {type(exc).__name__}: {exc}", delay_s=2.0)


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = make_client(endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, self.uri(key)) from exc
        return self.uri(key)

    def get(self, key: str) -> bytes:
        return self.get_object(self.bucket, self._key(key))

    def get_object(self, bucket: str, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read any object the credentials can reach (image references name their own bucket)."""
        what = f"s3://{bucket}/{key}"
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key)
            size = obj.get("ContentLength") or 0
            if max_bytes is not None and size > max_bytes:
                obj["Body"].close()
                raise PermanentError(
                    OBJECT_TOO_LARGE, f"{what} is {size} bytes, over the limit of {max_bytes} bytes"
                )
            return obj["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, what) from exc

    def get_uri(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        bucket, key = parse_s3_uri(uri)
        return self.get_object(bucket, key, max_bytes=max_bytes)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _MISSING:
                return False
            raise translate(exc, self.uri(key)) from exc

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the bucket) under `prefix` (relative to the bucket)."""
        keys: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"
