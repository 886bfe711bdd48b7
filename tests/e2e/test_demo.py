"""`bigmodel demo`: embedded with nothing set, and on Redis + PostgreSQL + S3 when configured."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import boto3
import pytest

from tests.e2e.conftest import BIGMODEL


def run_demo(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [BIGMODEL, "demo", "--images", "10", "--prompts", "10", "--device", "cpu"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_demo_runs_embedded_with_nothing_installed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGMODEL_")}
    env["COLUMNS"] = "200"
    proc = run_demo(env, tmp_path)
    assert "embedded" in proc.stdout and "completed" in proc.stdout
    assert "20 succeeded, 2 failed of 22" in proc.stdout
    home = tmp_path / ".bigmodel"
    assert (home / "bigmodel.db").is_file()
    outputs = list((home / "storage").rglob("output.jsonl"))
    assert len(outputs) == 1
    records = [json.loads(x) for x in outputs[0].read_text().splitlines()]
    assert len(records) == 20 and all(r["status"] == "succeeded" for r in records)
    errors = outputs[0].with_name("errors.jsonl").read_text().splitlines()
    assert {json.loads(x)["error"]["code"] for x in errors} == {
        "image_decode_failed",
        "prompt_too_long",
    }
    # A second run reuses the models it built.
    again = run_demo(env, tmp_path)
    assert "building" not in again.stdout


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_demo_uses_the_configured_services(stack, redis_client):
    env = {**stack.env, "COLUMNS": "200"}
    proc = run_demo(env, stack.home)
    assert "configured services" in proc.stdout and "completed" in proc.stdout
    assert "postgresql+psycopg://" in proc.stdout
    assert f"s3://{stack.bucket}/bigmodel/tenants/default/batches/" in proc.stdout
    s3 = boto3.client("s3", endpoint_url=stack.env["BIGMODEL_S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket)["Contents"]]
    assert sum(k.startswith("bigmodel/demo/images/") for k in keys) == 10
    assert any(k.endswith("/output.jsonl") for k in keys)
    assert not (stack.home / ".bigmodel").exists()  # nothing fell back to the embedded default
