"""The reconciler and the audit against real Redis, a real database and S3 over HTTP."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from bigmodel.core.settings import Settings
from bigmodel.ledger.models import BatchRow
from bigmodel.ledger.recovery import requeue_expired_leases
from bigmodel.ledger.repo import Finished
from producer import Client
from producer.api import parse_window


@pytest.fixture
def client(service_settings, redis_client, tiny_models):
    c = Client(service_settings(max_attempts=2, lease_s=60))
    c.register_model("gen", str(tiny_models["generator"]), task="generate", batch_size=4)
    yield c
    c.close()


def reqs(n):
    return [{"custom_id": f"r{i}", "model": "gen", "input": {"prompt": "x"}} for i in range(n)]


def ids_of(client, batch_id):
    return [
        rid
        for (rid,) in client.ledger.engine.connect().exec_driver_sql(
            f"SELECT id FROM requests WHERE batch_id = '{batch_id}' ORDER BY line"
        )
    ]


def test_expired_leases_come_back_alone_and_poison_fails(client, redis_client):
    batch = client.submit(reqs(3))
    redis_client.delete("bigmodel.model.gen")
    ids = ids_of(client, batch.id)
    client.ledger.claim(ids, worker="dead", lease_s=0.01)
    time.sleep(0.05)
    report = client.reconcile(lost_grace_s=3600)
    assert report.lease_requeued == 3 and report.poisoned == 0
    messages = [json.loads(m) for m in redis_client.lrange("bigmodel.model.gen", 0, -1)]
    assert len(messages) == 3  # one request per message, marked to run alone
    assert client.status(batch.id).counts["queued"] == 3

    client.ledger.claim(ids[:1], worker="dead-again", lease_s=0.01)  # second attempt
    time.sleep(0.05)
    back, poisoned = requeue_expired_leases(client.ledger, max_attempts=2)
    assert back == [] and poisoned == ids[:1]
    rec = next(client.results(batch.id))
    assert rec["status"] == "failed" and rec["error"]["code"] == "poison"


def test_lost_messages_are_reenqueued_once(client, redis_client):
    batch = client.submit(reqs(10))
    assert redis_client.llen("bigmodel.model.gen") == 3
    assert client.reconcile(lost_grace_s=0).lost_requeued == 0  # all present
    redis_client.flushdb()  # Redis restarted with nothing on disk
    assert client.reconcile(lost_grace_s=0).lost_requeued == 10
    assert client.reconcile(lost_grace_s=0).lost_requeued == 0
    assert redis_client.llen("bigmodel.model.gen") >= 1
    assert client.reconcile(lost_grace_s=3600).lost_requeued == 0  # too recent to judge
    assert client.status(batch.id).counts["queued"] == 10


def test_completion_window_expires_the_unfinished(client):
    batch = client.submit(reqs(4), completion_window="1h")
    assert batch.expires_at is not None
    ids = ids_of(client, batch.id)
    client.ledger.claim(ids[:1], worker="w")
    client.ledger.finish([Finished(ids[0], "succeeded", output={"sequences": []})])
    with client.ledger.Session.begin() as s:
        s.execute(
            update(BatchRow)
            .where(BatchRow.id == batch.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    report = client.reconcile(lost_grace_s=3600)
    assert report.expired == {batch.id: 3} and report.finalized == [batch.id]
    info = client.status(batch.id)
    assert info.status == "expired" and info.counts["expired"] == 3
    assert {r["error"]["code"] for r in client.results(batch.id) if r["error"]} == {"batch_expired"}
    assert client.audit(batch.id).ok


def test_audit_finds_lost_doubled_and_mismatched(client):
    batch = client.submit(reqs(3))
    ids = ids_of(client, batch.id)
    client.ledger.claim(ids, worker="w")
    client.ledger.finish([Finished(i, "succeeded", output={"n": i}) for i in ids])
    # Just finished: its worker writes the files; the reconciler leaves it for the grace period.
    assert client.reconcile(lost_grace_s=3600).finalized == []
    assert client.status(batch.id).status == "in_progress"
    assert client.reconcile(lost_grace_s=0).finalized == [batch.id]
    info = client.status(batch.id)
    assert info.status == "completed"
    audit = client.audit(batch.id)
    assert audit.ok and (audit.submitted, audit.in_ledger, audit.final) == (3, 3, 3)

    lines = client.storage.get(info.output_key).decode().splitlines()
    bad = [lines[0], lines[0], lines[1].replace('"n":', '"m":')]  # r0 twice, r1 altered, r2 gone
    client.storage.put(info.output_key, ("\n".join(bad) + "\n").encode())
    audit = client.audit(batch.id)
    assert (audit.lost, audit.doubled, audit.mismatched) == (1, 1, 1)
    assert audit.examples == {"lost": ["r2"], "doubled": ["r0"], "mismatched": ["r1"]}


def test_completion_window_parsing():
    assert parse_window("24h") == timedelta(hours=24)
    assert parse_window("90s") == timedelta(seconds=90)
    with pytest.raises(ValueError, match="use a number and a unit"):
        parse_window("tomorrow")
    with pytest.raises(ValueError, match="between 1s and 30d"):
        parse_window("60d")


def test_workers_take_turns_at_the_reconciler(client, tmp_path):
    from bigmodel.broker import make_celery, take_turn

    app = client.celery  # Redis: one turn per period across every process on the broker
    assert take_turn(app, "test-chore", 0.5)
    assert not take_turn(app, "test-chore", 0.5)
    assert take_turn(app, "other-chore", 0.5)  # each chore has its own turns
    time.sleep(0.6)
    assert take_turn(app, "test-chore", 0.5)  # the holder's turn ran out
    # The embedded filesystem broker has one process: always its turn.
    embedded = make_celery(Settings(home=tmp_path / "embedded", broker_url=None))
    assert take_turn(embedded, "test-chore", 60) and take_turn(embedded, "test-chore", 60)
