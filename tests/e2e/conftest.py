"""Real processes: the `bigmodel` CLI and `bigmodel worker`, on Redis, a database and S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The console script users run, from the environment running the tests.
BIGMODEL = str(Path(sys.executable).with_name("bigmodel"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Stack:
    """The environment a business system and a worker would share."""

    env: dict[str, str]
    home: Path
    bucket: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def cli(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None):
        proc = subprocess.run(
            [BIGMODEL, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=self.home,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"bigmodel {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def start_worker(
        self,
        *models: str,
        extra: tuple[str, ...] = (),
        name: str = "w1",
        ready_timeout_s: float = 120,
    ) -> subprocess.Popen:
        log = self.home / f"worker-{name}.log"
        args = [BIGMODEL, "worker", "--device", "cpu", "--name", name, *extra]
        for m in models:
            args += ["--model", m]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.home
            )
        self.workers.append(proc)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "consuming bigmodel.model." in text:
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"worker exited {proc.returncode}:\n{text}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {ready_timeout_s}s:\n{log.read_text()}")

    def sql(self, query: str, **params):
        from sqlalchemy import create_engine, text

        url = self.env["BIGMODEL_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://")
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return conn.execute(text(query), params).all()
        finally:
            engine.dispose()

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers.clear()

    def wait_final(self, batch_id: str, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.cli_json("status", batch_id)
            if info["status"] in {"completed", "failed", "cancelled", "expired"}:
                return info
            for proc in self.workers:
                # Killed on purpose (negative) or stopped cleanly (0) is fine; an error is not.
                if proc.poll() is not None and proc.returncode > 0:
                    raise AssertionError(f"a worker failed with exit code {proc.returncode}")
            time.sleep(0.5)
        raise AssertionError(f"batch {batch_id} not final after {timeout_s}s: {info}")


@pytest.fixture
def stack(
    request, tmp_path, redis_client, redis_url, database_url, s3_endpoint, s3_bucket, tiny_models
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGMODEL_")}
    env.update(
        {
            "BIGMODEL_HOME": str(tmp_path / "home"),
            "BIGMODEL_BROKER_URL": redis_url,
            "BIGMODEL_DATABASE_URL": database_url,
            "BIGMODEL_STORAGE_URL": f"s3://{s3_bucket}/bigmodel",
            "BIGMODEL_S3_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    s = Stack(env=env, home=tmp_path, bucket=s3_bucket)
    s.cli(
        "models",
        "register",
        "cls",
        str(tiny_models["classifier"]),
        "--task",
        "classify",
        "--arch",
        "resnet18",
        "--batch-size",
        "16",
    )
    s.cli(
        "models",
        "register",
        "gen",
        str(tiny_models["generator"]),
        "--task",
        "generate",
        "--batch-size",
        "8",
    )
    yield s
    s.stop_workers()
