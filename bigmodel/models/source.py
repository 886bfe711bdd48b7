"""Resolving a model's source: a local folder, an s3:// prefix (downloaded once), or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from bigmodel.core.errors import ConfigError
from bigmodel.core.settings import Settings


def resolve_source(source: str, settings: Settings) -> str:
    """Return a local folder, or the hub id unchanged for `from_pretrained` to resolve."""
    if source.startswith("s3://"):
        return str(download_prefix(source, settings))
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model source {source!r} is a file; expected a folder")
        return str(path.resolve())
    if source.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"model source {source!r} does not exist")
    return source


def download_prefix(uri: str, settings: Settings) -> Path:
    """Copy every object under an s3:// prefix into the local model cache (once)."""
    from bigmodel.storage.base import parse_s3_uri
    from bigmodel.storage.s3 import S3Storage

    bucket, prefix = parse_s3_uri(uri, need_key=False)
    store = S3Storage(bucket, endpoint_url=settings.s3_endpoint_url)
    target = (settings.home / "models" / bucket / prefix).resolve()
    keys = [k for k in store.list(prefix + "/" if prefix else "") if not k.endswith("/")]
    if not keys:
        raise ConfigError(f"model source {uri!r} holds no objects")
    for key in keys:
        rel = key[len(prefix) :].lstrip("/") if prefix else key
        dest = target / rel
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".part{os.getpid()}")
        tmp.write_bytes(store.get_object(bucket, key))
        os.replace(tmp, dest)
    return target
