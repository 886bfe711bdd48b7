"""The ledger on real SQLite and PostgreSQL, with storage on moto's S3 server over HTTP."""

import json

import pytest
from sqlalchemy import inspect

from bigmodel.core.errors import ConfigError, NotFound
from bigmodel.core.requests import RequestSpec
from bigmodel.core.status import BatchStatus, RequestStatus, Task
from bigmodel.ledger.db import current_revision, head_revision, make_engine, require_schema
from bigmodel.ledger.finalize import finalize_batch, iter_records
from bigmodel.ledger.repo import Finished, Ledger
from bigmodel.storage import open_storage


@pytest.fixture
def ledger(database_url):
    engine = make_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    yield Ledger(engine)
    engine.dispose()


@pytest.fixture
def storage(s3_endpoint, s3_bucket):
    return open_storage(f"s3://{s3_bucket}/pfx", endpoint_url=s3_endpoint)


def specs(n, model="gen"):
    return [
        RequestSpec(
            i + 1, f"r{i}", model, Task.GENERATE, {"prompt": f"p{i}"}, {"max_new_tokens": 2}
        )
        for i in range(n)
    ]


def test_migrations_reach_head_with_the_query_indexes(ledger):
    require_schema(ledger.engine)
    assert current_revision(ledger.engine) == head_revision()
    insp = inspect(ledger.engine)
    assert {"models", "batches", "requests"} <= set(insp.get_table_names())
    idx = {i["name"]: i["column_names"] for i in insp.get_indexes("requests")}
    assert idx["ix_requests_batch_id_status"] == ["batch_id", "status"]
    uniques = [u["column_names"] for u in insp.get_unique_constraints("requests")]
    assert ["batch_id", "custom_id"] in uniques


def test_empty_database_names_the_fix(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigError, match="run `bigmodel db upgrade`"):
        require_schema(engine)


def test_models_get_versions(ledger):
    a = ledger.register_model("gen", task="generate", source="/m/1")
    b = ledger.register_model("gen", task="generate", source="/m/2", batch_size=8)
    assert (a.version, b.version) == (1, 2)
    assert ledger.get_model("gen").source == "/m/2"
    assert ledger.get_model("gen", version=1).source == "/m/1"
    assert [m.name for m in ledger.list_models()] == ["gen"]
    with pytest.raises(NotFound, match="model 'nope' is not registered .known: gen"):
        ledger.get_model("nope")
    with pytest.raises(ConfigError, match="model name 'bad name'"):
        ledger.register_model("bad name", task="generate", source="x")


def test_claim_and_finish_are_idempotent(ledger, storage):
    pairs = ledger.create_batch("b1", specs(3), input_key=None, versions={"gen": 1})
    ids = [rid for rid, _ in pairs]
    assert ledger.get_batch("b1").counts["queued"] == 3

    claimed = ledger.claim(ids, worker="w1")
    assert [c.item.id for c in claimed] == ids and all(c.attempts == 1 for c in claimed)
    assert claimed[0].item.input == {"prompt": "p0"}
    assert ledger.get_batch("b1").status == BatchStatus.IN_PROGRESS
    assert ledger.claim(ids, worker="w2") == []  # a redelivered message claims nothing

    done = [
        Finished(ids[0], RequestStatus.SUCCEEDED, output={"sequences": []}),
        Finished(
            ids[1], RequestStatus.FAILED, error_code="prompt_too_long", error_message="too long"
        ),
    ]
    assert ledger.finish(done) == 2
    assert ledger.finish(done) == 0  # a second writer changes nothing
    assert finalize_batch(ledger, storage, "b1") is None  # r2 still running

    assert ledger.release([ids[2]]) == 1
    assert ledger.claim([ids[2]], worker="w2")[0].attempts == 2
    ledger.finish([Finished(ids[2], RequestStatus.SUCCEEDED, output={"sequences": ["x"]})])
    assert finalize_batch(ledger, storage, "b1") == BatchStatus.COMPLETED
    assert finalize_batch(ledger, storage, "b1") is None  # final once

    info = ledger.get_batch("b1")
    assert info.counts == {
        "total": 3,
        "queued": 0,
        "running": 0,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 0,
        "expired": 0,
    }
    out = [json.loads(x) for x in storage.get(info.output_key).splitlines()]
    err = [json.loads(x) for x in storage.get(info.errors_key).splitlines()]
    assert [r["custom_id"] for r in out] == ["r0", "r2"]
    assert err == [
        {
            "custom_id": "r1",
            "status": "failed",
            "output": None,
            "error": {"code": "prompt_too_long", "message": "too long"},
        }
    ]
    assert info.output_key.startswith("tenants/default/batches/b1/")


def test_cancel_cancels_queued_at_once_and_running_finish(ledger, storage):
    pairs = ledger.create_batch("b2", specs(4), input_key=None, versions={})
    ids = [rid for rid, _ in pairs]
    ledger.claim(ids[:1], worker="w")
    assert ledger.cancel("b2") == 3
    info = ledger.get_batch("b2")
    assert info.status == BatchStatus.CANCELLING
    assert info.counts["queued"] == 0 and info.counts["cancelled"] == 3
    assert finalize_batch(ledger, storage, "b2") is None
    ledger.finish([Finished(ids[0], RequestStatus.SUCCEEDED, output={"sequences": []})])
    assert finalize_batch(ledger, storage, "b2") == BatchStatus.CANCELLED
    recs = list(iter_records(ledger, storage, "b2"))
    assert [r["status"] for r in recs] == ["succeeded", "cancelled", "cancelled", "cancelled"]
    assert recs[1]["error"]["code"] == "batch_cancelled"
    assert ledger.cancel("b2") == 0  # a final batch stays as it is


def test_duplicate_custom_id_cannot_enter_the_ledger(ledger):
    from sqlalchemy.exc import IntegrityError

    dup = specs(2)
    dup[1] = RequestSpec(2, "r0", "gen", Task.GENERATE, {"prompt": "x"}, {})
    with pytest.raises(IntegrityError):
        ledger.create_batch("b3", dup, input_key=None, versions={})
    with pytest.raises(NotFound):
        ledger.get_batch("b3")  # the whole transaction rolled back


def test_a_result_postgresql_cannot_store_raises_sqlalchemys_data_error(ledger):
    from sqlalchemy.exc import DataError

    pairs = ledger.create_batch("b4", specs(2), input_key=None, versions={})
    ids = [rid for rid, _ in pairs]
    ledger.claim(ids, worker="w")
    bad = [
        Finished(ids[0], RequestStatus.SUCCEEDED, output={"text": "nul\x00here"}),
        Finished(ids[1], RequestStatus.SUCCEEDED, output={"text": "fine"}),
    ]
    if ledger.engine.dialect.name == "postgresql":
        with pytest.raises(DataError):  # the worker then writes rows one by one
            ledger.finish(bad)
        assert ledger.finish(bad[1:]) == 1
    else:
        assert ledger.finish(bad) == 2
