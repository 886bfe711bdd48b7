"""The Python API on real Redis, a real database and S3 over HTTP (no worker running)."""

from __future__ import annotations

import json

import pytest

from bigmodel.core.errors import BigModelError, ConfigError, NotFound, SubmissionRejected
from bigmodel.core.settings import Settings
from producer import Client


@pytest.fixture
def client(service_settings, redis_client, tiny_models):
    c = Client(service_settings())
    c.register_model("gen", str(tiny_models["generator"]), task="generate", batch_size=8)
    c.register_model("cls", str(tiny_models["classifier"]), task="classify", arch="resnet18")
    yield c
    c.close()


def records(n, model="gen"):
    return [
        {
            "custom_id": f"r{i}",
            "model": model,
            "input": {"prompt": f"p {i} é"},
            "params": {"max_new_tokens": 3},
        }
        for i in range(n)
    ]


def test_submit_records_ledger_rows_input_file_and_chunked_messages(client, redis_client):
    info = client.submit(records(70), metadata={"team": "ops"})
    assert info.status == "queued" and info.counts["queued"] == 70
    assert client.status(info.id).as_dict() == info.as_dict()  # what submit returned is stored
    # 70 requests in chunks of the model's batch size (8): 9 messages, not 70.
    assert redis_client.llen("bigmodel.model.gen") == 9
    raw = json.loads(redis_client.lindex("bigmodel.model.gen", 0))
    assert raw["headers"]["task"] == "bigmodel.run_chunk"
    assert raw["content-type"] == "application/json"
    stored = client.storage.get(info.input_key).decode().splitlines()
    assert [json.loads(x)["custom_id"] for x in stored] == [f"r{i}" for i in range(70)]
    assert json.loads(stored[0])["input"]["prompt"] == "p 0 é"
    assert [r["custom_id"] for r in client.results(info.id)][:3] == ["r0", "r1", "r2"]
    assert client.batches()[0].id == info.id


def test_a_rejected_submission_writes_nothing(client, redis_client):
    bad = records(3) + [{"custom_id": "x", "model": "cls", "input": {"image": "ftp://no"}}]
    with pytest.raises(SubmissionRejected) as err:
        client.submit(bad)
    assert err.value.errors[0].line == 4
    assert client.batches() == [] and redis_client.keys("bigmodel.model.*") == []
    with pytest.raises(SubmissionRejected, match="not JSON-serialisable"):
        client.submit([{"custom_id": "a", "model": "gen", "input": {"prompt": object()}}])


def test_broker_down_at_submit_fails_the_recorded_batch(service_settings, tiny_models):
    c = Client(service_settings(broker_url="redis://127.0.0.1:1/0"))
    c.celery.conf.broker_connection_max_retries = 1
    c.celery.conf.broker_connection_timeout = 1
    c.register_model("gen", str(tiny_models["generator"]), task="generate")
    with pytest.raises(BigModelError, match="could not be enqueued"):
        c.submit(records(2))
    (batch,) = c.batches()
    assert batch.status == "failed" and batch.counts["failed"] == 2
    assert {r["error"]["code"] for r in c.results(batch.id)} == {"enqueue_failed"}
    c.close()


def test_registration_checks_say_what_to_fix(client, tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="needs --arch"):
        client.register_model("c2", str(tiny_models["classifier"]), task="classify")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="missing model.safetensors, labels.json"):
        client.register_model("c2", str(tmp_path / "empty"), task="classify", arch="resnet18")
    with pytest.raises(ConfigError, match="no config.json"):
        client.register_model("g2", str(tmp_path / "empty"), task="generate")
    with pytest.raises(ConfigError, match="use classify or generate"):
        client.register_model("g2", "gpt2", task="embed")
    with pytest.raises(ConfigError, match="does not exist"):
        client.register_model("g2", "./nope", task="generate")
    hub = client.register_model("g3", "gpt2", task="generate")  # a hub id, resolved by workers
    assert hub.source == "gpt2" and hub.batch_size == 16
    with pytest.raises(ConfigError, match="use `null:` or `null:delay_ms=N`"):
        client.register_model("n1", "null:delay=5", task="generate")
    assert (
        client.register_model("n2", "null:delay_ms=5", task="generate").source == "null:delay_ms=5"
    )
    with pytest.raises(NotFound, match="batch 'batch_x' not found"):
        client.status("batch_x")


def test_storage_down_at_submit_writes_nothing(
    tmp_path, redis_client, redis_url, database_url, tiny_models
):
    from tests.conftest import free_port

    settings = Settings(
        home=tmp_path,
        broker_url=redis_url,
        database_url=database_url,
        storage_url="s3://nowhere/p",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
    )
    c = Client(settings)
    c.register_model("gen", str(tiny_models["generator"]), task="generate")
    c.storage.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(BigModelError, match="s3://nowhere/p/tenants/default/batches/"):
        c.submit(records(2))
    assert c.batches() == [] and redis_client.keys("bigmodel.model.*") == []
    c.close()


def test_database_down_at_submit_enqueues_nothing(tmp_path, redis_client, redis_url):
    from sqlalchemy.exc import OperationalError

    from tests.conftest import free_port

    settings = Settings(
        home=tmp_path,
        broker_url=redis_url,
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
    )
    with pytest.raises(OperationalError):
        Client(settings).submit(records(2))
    assert redis_client.keys("bigmodel.model.*") == []


def test_oversized_files_are_rejected_before_anything_is_written(
    tmp_path, redis_client, redis_url, database_url
):
    settings = Settings(
        home=tmp_path, broker_url=redis_url, database_url=database_url, max_file_bytes=100
    )
    c = Client(settings)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"custom_id": "a", "model": "m", "input": {"prompt": "x" * 200}}))
    with pytest.raises(SubmissionRejected, match="over the limit of 100; split it"):
        c.submit(big)
    with pytest.raises(SubmissionRejected, match="over the limit of 100"):
        c.submit([{"custom_id": "a", "model": "m", "input": {"prompt": "x" * 200}}])
    assert c.batches() == [] and redis_client.keys("bigmodel.model.*") == []
    c.close()
