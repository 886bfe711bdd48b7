"""The storage interface and the key layout."""

from __future__ import annotations

from abc import ABC, abstractmethod


def parse_s3_uri(uri: str, *, need_key: bool = True) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or (need_key and not key):
        raise ValueError(f"{uri!r}: expected s3://bucket/key")
    return bucket, key.strip("/") if not need_key else key


def batch_key(tenant: str, batch_id: str, name: str) -> str:
    """Where a batch's files live: tenants/<tenant>/batches/<id>/<name>."""
    return f"tenants/{tenant}/batches/{batch_id}/{name}"


class Storage(ABC):
    """Keys are relative to the store's root (a bucket prefix or a folder)."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Store `data` under `key`, replacing what was there; return the object's URI."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read the object; raise `PermanentError(object_not_found)` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI a person or another tool can use to find the object."""
