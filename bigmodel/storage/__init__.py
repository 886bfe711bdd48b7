"""Object storage: S3-compatible (boto3) and a local folder, behind one small interface."""

from __future__ import annotations

from bigmodel.storage.base import Storage, batch_key, parse_s3_uri
from bigmodel.storage.local import LocalStorage


def open_storage(url: str, *, endpoint_url: str | None = None) -> Storage:
    """`s3://bucket/prefix` gives S3 storage; anything else is a local folder."""
    if url.startswith("s3://"):
        from bigmodel.storage.s3 import S3Storage

        bucket, prefix = parse_s3_uri(url, need_key=False)
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"storage URL {url!r}: use s3://bucket/prefix or a local folder path")
    return LocalStorage(url.removeprefix("file://"))


__all__ = ["LocalStorage", "Storage", "batch_key", "open_storage", "parse_s3_uri"]
