"""Fetching request inputs by reference: s3://, https:// (and http://) and data: URIs."""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request

from bigmodel.core.errors import (
    FETCH_FAILED,
    INVALID_INPUT,
    OBJECT_NOT_FOUND,
    OBJECT_TOO_LARGE,
    PermanentError,
    RetryableError,
)


class Fetcher:
    """Reads input bytes with a size limit; missing objects are permanent, outages retryable."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        timeout_s: float = 30.0,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._s3 = None

    def _s3_storage(self):
        if self._s3 is None:
            from bigmodel.storage.s3 import S3Storage

            self._s3 = S3Storage("unused", endpoint_url=self.endpoint_url)
        return self._s3

    def fetch(self, uri: str) -> bytes:
        if uri.startswith("data:"):
            return self._data(uri)
        if uri.startswith("s3://"):
            try:
                return self._s3_storage().get_uri(uri, max_bytes=self.max_bytes)
            except ValueError as exc:
                raise PermanentError(INVALID_INPUT, str(exc)) from None
        if uri.startswith(("https://", "http://")):
            return self._http(uri)
        raise PermanentError(INVALID_INPUT, f"unsupported input reference {uri[:80]!r}")

    def _data(self, uri: str) -> bytes:
        header, sep, payload = uri.partition(",")
        if not sep or not header.endswith(";base64"):
            raise PermanentError(INVALID_INPUT, "data: URI must be data:<type>;base64,<data>")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise PermanentError(
                OBJECT_TOO_LARGE, f"data: URI is over the limit of {self.max_bytes} bytes"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PermanentError(INVALID_INPUT, f"data: URI is not valid base64: {exc}") from None

    def _http(self, uri: str) -> bytes:
        req = urllib.request.Request(uri, headers={"User-Agent": "bigmodel"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                data = resp.read(self.max_bytes + 1)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise PermanentError(OBJECT_NOT_FOUND, f"{uri}: HTTP {exc.code}") from None
            if exc.code in (408, 429) or exc.code >= 500:
                raise RetryableError(f"{uri}: HTTP {exc.code}", delay_s=2.0) from None
            raise PermanentError(FETCH_FAILED, f"{uri}: HTTP {exc.code}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RetryableError(f"{uri}: {reason}", delay_s=2.0) from None
        if len(data) > self.max_bytes:
            raise PermanentError(
                OBJECT_TOO_LARGE, f"{uri} is over the limit of {self.max_bytes} bytes"
            )
        return data
