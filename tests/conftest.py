"""Shared fixtures: the real services (Redis, PostgreSQL, SQLite, S3 over HTTP) and tiny models.

A missing service skips a test on a laptop but fails it when `CI` is set, so CI never passes by
skipping.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import pytest

logging.getLogger("werkzeug").setLevel(logging.WARNING)

REDIS_URL = os.environ.get("BIGMODEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PG_ADMIN_URL = os.environ.get(
    "BIGMODEL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def service_missing(what: str, exc: BaseException) -> None:
    msg = f"{what} is not reachable: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI is set: a missing service is a failure)")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        service_missing(f"Redis at {REDIS_URL}", exc)
    client.flushdb()
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """A fresh database on the local PostgreSQL server for this test session."""
    import psycopg

    name = f"bigmodel_test_{os.getpid()}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        service_missing(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _reset_pg(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty, migrated ledger database: an SQLite file, then PostgreSQL."""
    from bigmodel.ledger.db import make_engine, upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("pg_server_url")
        _reset_pg(url)
    engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's standalone S3 server on loopback, spoken to over real HTTP."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        service_missing("moto[server]", exc)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    import boto3

    name = f"bm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny resnet18 classifier and a tiny GPT-2 generator, random weights, fixed seeds."""
    from transformers.utils import logging as hf_logging

    from bigmodel.models.tiny import build_tiny_classifier, build_tiny_generator

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("models")
    return {
        "classifier": build_tiny_classifier(root / "classifier", arch="resnet18", num_classes=10),
        "generator": build_tiny_generator(root / "generator"),
    }
