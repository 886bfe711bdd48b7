"""The whole path: CLI submit -> Redis -> worker process -> database + S3 -> CLI results."""

from __future__ import annotations

import base64
import csv
import json
import time
from datetime import UTC, datetime

import boto3
import pytest
from sqlalchemy import create_engine, text

from bigmodel.core.requests import GenerateParams
from bigmodel.core.runner import Item, RunLoop
from bigmodel.core.settings import Settings
from bigmodel.core.status import Task
from bigmodel.ledger.repo import ModelInfo
from bigmodel.models import load_runner
from bigmodel.models.tiny import make_images

PROMPTS = [
    "Hello there",
    "The quick brown fox",
    "请用一句话介绍批量推理：",
    "Le renard brun saute par-dessus le chien paresseux",
    "Erkläre kurz:",
    "Once upon",
]


def build_requests(stack) -> tuple[list[dict], dict[str, str]]:
    """55 classify and 56 generate requests; `bad` maps custom_id -> expected error code."""
    s3 = boto3.client("s3", endpoint_url=stack.env["BIGMODEL_S3_ENDPOINT_URL"])
    reqs: list[dict] = []
    images = make_images(45, size=72, seed=7) + make_images(6, size=40, seed=8, fmt="PNG")
    for i, img in enumerate(images):
        if i < 45:
            key = f"inputs/img-{i:03d}.jpg"
            s3.put_object(Bucket=stack.bucket, Key=key, Body=img)
            ref = f"s3://{stack.bucket}/{key}"
        else:
            ref = "data:image/png;base64," + base64.b64encode(img).decode()
        reqs.append(
            {
                "custom_id": f"img-{i:03d}",
                "model": "cls",
                "input": {"image": ref},
                "params": {"top_k": 1 + i % 5},
            }
        )
    s3.put_object(Bucket=stack.bucket, Key="inputs/not-an-image.jpg", Body=b"hello, I am text")
    s3.put_object(Bucket=stack.bucket, Key="inputs/truncated.jpg", Body=images[0][:300])
    s3.put_object(Bucket=stack.bucket, Key="inputs/empty.jpg", Body=b"")
    bad = {
        "img-missing": "object_not_found",
        "img-text": "image_decode_failed",
        "img-truncated": "image_decode_failed",
        "img-empty": "image_decode_failed",
    }
    for cid, key in [
        ("img-missing", "inputs/nope.jpg"),
        ("img-text", "inputs/not-an-image.jpg"),
        ("img-truncated", "inputs/truncated.jpg"),
        ("img-empty", "inputs/empty.jpg"),
    ]:
        reqs.append(
            {"custom_id": cid, "model": "cls", "input": {"image": f"s3://{stack.bucket}/{key}"}}
        )
    for i in range(54):
        params: dict = {"max_new_tokens": 4 + i % 9}
        if i % 3 == 1:
            params.update(do_sample=True, seed=i, temperature=0.8, top_p=0.95)
        if i % 9 == 2:
            params.update(do_sample=True, seed=i, num_return_sequences=2)
        if i % 10 == 5:
            params["stop"] = ["e"]
        reqs.append(
            {
                "custom_id": f"txt-{i:03d}",
                "model": "gen",
                "input": {"prompt": PROMPTS[i % len(PROMPTS)]},
                "params": params,
            }
        )
    reqs.append(
        {"custom_id": "txt-too-long", "model": "gen", "input": {"prompt": "many words " * 300}}
    )
    reqs.append(
        {
            "custom_id": "txt-window",
            "model": "gen",
            "input": {"prompt": "Hello"},
            "params": {"max_new_tokens": 500},
        }
    )
    bad |= {"txt-too-long": "prompt_too_long", "txt-window": "prompt_too_long"}
    return reqs, bad


def expected_generations(tiny_models, reqs) -> dict[str, dict]:
    """The same generate requests through the model in this process, one at a time."""
    info = ModelInfo(
        "gen", 1, Task.GENERATE, str(tiny_models["generator"]), None, 8, {}, datetime.now(UTC)
    )
    loop = RunLoop(load_runner(info, device="cpu", settings=Settings()), max_batch_size=1)
    out = {}
    for r in reqs:
        if r["model"] == "gen" and r["custom_id"].startswith("txt-0"):
            params = GenerateParams(**r.get("params", {})).model_dump()
            out[r["custom_id"]] = loop.run([Item(0, r["input"], params)])[0].output
    return out


def read_s3_jsonl(stack, key: str) -> list[dict]:
    s3 = boto3.client("s3", endpoint_url=stack.env["BIGMODEL_S3_ENDPOINT_URL"])
    body = s3.get_object(Bucket=stack.bucket, Key=f"bigmodel/{key}")["Body"].read()
    return [json.loads(line) for line in body.decode().splitlines()]


def test_bulk_job_end_to_end(stack, tiny_models, redis_client, database_url):
    reqs, bad = build_requests(stack)
    assert sum(r["model"] == "cls" for r in reqs) >= 50
    assert sum(r["model"] == "gen" for r in reqs) >= 50
    path = stack.home / "job.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reqs), encoding="utf-8"
    )

    stack.start_worker("cls", "gen")
    submitted = stack.cli("submit", str(path), "--wait", "--json", timeout=300)
    info = json.loads(submitted.stdout)
    batch_id = info["id"]
    assert batch_id.startswith("batch_")
    assert info["status"] == "completed"
    assert info["counts"] == {
        "total": len(reqs),
        "queued": 0,
        "running": 0,
        "succeeded": len(reqs) - len(bad),
        "failed": len(bad),
        "cancelled": 0,
        "expired": 0,
    }
    assert stack.cli_json("status", batch_id)["status"] == "completed"

    # Every request is in the ledger, final, once, with the right output or error.
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = {
            r.custom_id: r
            for r in conn.execute(
                text(
                    "SELECT custom_id, status, attempts, output, output_key, error_code, "
                    "error_message, worker, input, started_at, finished_at FROM requests "
                    "WHERE batch_id = :b"
                ),
                {"b": batch_id},
            )
        }
    engine.dispose()
    assert set(rows) == {r["custom_id"] for r in reqs}

    def as_json(v):
        return json.loads(v) if isinstance(v, str) else v

    expected_text = expected_generations(tiny_models, reqs)
    for r in reqs:
        row = rows[r["custom_id"]]
        assert row.attempts == 1 and row.worker == "w1" and row.finished_at >= row.started_at
        if r["custom_id"] in bad:
            assert (row.status, row.error_code) == ("failed", bad[r["custom_id"]]), row
            assert row.output is None and row.error_message
            continue
        assert row.status == "succeeded" and row.error_code is None, row
        out = as_json(row.output)
        if r["model"] == "cls":
            labels = out["labels"]
            assert len(labels) == r["params"]["top_k"]
            assert all(x["label"] == f"class_{x['index']:02d}" for x in labels)
            assert all(0.0 <= x["score"] <= 1.0 for x in labels)
        else:
            # Batched in the worker, one at a time here: the same text, token for token.
            assert out == expected_text[r["custom_id"]], r["custom_id"]
    prompt = as_json(rows["txt-002"].input)["prompt"]
    assert prompt == "请用一句话介绍批量推理："

    # output.jsonl / errors.jsonl in S3 agree with the database and with `bigmodel results`.
    info = stack.cli_json("status", batch_id)
    out_file = read_s3_jsonl(stack, info["output_key"])
    err_file = read_s3_jsonl(stack, info["errors_key"])
    assert {r["custom_id"] for r in out_file} == set(rows) - set(bad)
    assert {r["custom_id"]: r["error"]["code"] for r in err_file} == bad
    for rec in out_file:
        assert rec["status"] == "succeeded" and rec["output"] == as_json(
            rows[rec["custom_id"]].output
        )
    results = [json.loads(x) for x in stack.cli("results", batch_id).stdout.splitlines()]
    assert [r["custom_id"] for r in results] == [r["custom_id"] for r in reqs]
    assert sorted(results, key=lambda r: r["custom_id"]) == sorted(
        out_file + err_file, key=lambda r: r["custom_id"]
    )

    csv_path = stack.home / "results.csv"
    stack.cli("results", batch_id, "--format", "csv", "--output", str(csv_path))
    with open(csv_path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(reqs) and set(table[0]) == {"custom_id", "status", "output", "error"}
    assert (
        json.loads(next(t for t in table if t["custom_id"] == "img-missing")["error"])["code"]
        == "object_not_found"
    )

    # Nothing is left in Redis: every message was consumed and acknowledged.
    assert redis_client.llen("bigmodel.model.cls") == 0
    assert redis_client.llen("bigmodel.model.gen") == 0
    assert not redis_client.hlen("unacked")


def test_bad_submission_is_rejected_whole(stack, redis_client):
    lines = [
        json.dumps({"custom_id": "a", "model": "gen", "input": {"prompt": "fine"}}),
        "{broken",
        json.dumps({"custom_id": "a", "model": "gen", "input": {"prompt": "dup"}}),
        json.dumps({"custom_id": "c", "model": "cls", "input": {"prompt": "wrong task"}}),
        json.dumps({"custom_id": "d", "model": "nope", "input": {"prompt": "x"}}),
        json.dumps(
            {
                "custom_id": "e",
                "model": "gen",
                "input": {"prompt": "x"},
                "params": {"temperature": -1},
            }
        ),
    ]
    path = stack.home / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = stack.cli("submit", str(path), check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    for fragment in [
        "5 of 6 lines are invalid",
        "line 2: invalid JSON",
        "line 3 (custom_id 'a'), field 'custom_id': duplicate custom_id",
        "line 4 (custom_id 'c'), field 'input.image'",
        "unknown model 'nope'",
        "line 6 (custom_id 'e'), field 'params.temperature'",
    ]:
        assert fragment in proc.stderr, proc.stderr
    as_json = stack.cli("submit", str(path), "--json", check=False)
    assert sorted({e["line"] for e in json.loads(as_json.stdout)["lines"]}) == [2, 3, 4, 5, 6]
    assert stack.cli_json("batches") == []
    assert redis_client.keys("bigmodel.model.*") == []

    missing = stack.cli("status", "batch_nope", check=False)
    assert missing.returncode == 2 and "batch 'batch_nope' not found" in missing.stderr
    empty = stack.home / "empty.jsonl"
    empty.write_text("")
    assert "holds no requests" in stack.cli("submit", str(empty), check=False).stderr


def test_cancel_leaves_no_queued_request(stack):
    reqs = [
        {
            "custom_id": f"q{i}",
            "model": "gen",
            "input": {"prompt": "Hello"},
            "params": {"max_new_tokens": 100},
        }
        for i in range(60)
    ]
    path = stack.home / "job.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))

    # Cancelled before any worker runs: every request is cancelled at once.
    idle = stack.cli("submit", str(path)).stdout.strip()
    info = stack.cli_json("cancel", idle)
    assert info["status"] == "cancelled"
    assert info["counts"]["cancelled"] == 60 and info["counts"]["queued"] == 0
    assert len(read_s3_jsonl(stack, info["errors_key"])) == 60

    # Cancelled while a worker is busy with it: running requests finish, none stays queued.
    stack.start_worker("gen", extra=("--max-batch-size", "2"))
    busy = stack.cli("submit", str(path)).stdout.strip()
    deadline = time.monotonic() + 120
    while stack.cli_json("status", busy)["counts"]["succeeded"] == 0:
        assert time.monotonic() < deadline
    cancelled = stack.cli_json("cancel", busy)
    assert cancelled["counts"]["queued"] == 0
    assert cancelled["status"] in {"cancelling", "cancelled"}
    final = stack.wait_final(busy)
    c = final["counts"]
    assert final["status"] == "cancelled"
    assert c["queued"] == c["running"] == 0
    assert c["succeeded"] >= 1 and c["cancelled"] >= 1 and c["succeeded"] + c["cancelled"] == 60
    # The idle batch's stale messages, consumed by the worker, changed nothing.
    assert stack.cli_json("status", idle)["counts"]["cancelled"] == 60


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_drops_pickle_and_malformed_messages_and_goes_on(stack, redis_client):
    from kombu import Connection

    stack.start_worker("gen")
    with Connection(stack.env["BIGMODEL_BROKER_URL"]) as conn:
        producer = conn.Producer()
        producer.publish(
            {"v": 1, "batch_id": "b", "model": "gen", "ids": [1]},
            routing_key="bigmodel.model.gen",
            serializer="pickle",
            headers={"task": "bigmodel.run_chunk"},
        )
        producer.publish(
            [[{"v": 1, "ids": "not a list"}], {}, {}],
            routing_key="bigmodel.model.gen",
            serializer="json",
            headers={"task": "bigmodel.run_chunk"},
        )
        producer.publish(
            [[], {}, {}],
            routing_key="bigmodel.model.gen",
            serializer="json",
            headers={"task": "os.system"},
        )
    path = stack.home / "ok.jsonl"
    path.write_text(
        json.dumps(
            {
                "custom_id": "a",
                "model": "gen",
                "input": {"prompt": "hi"},
                "params": {"max_new_tokens": 2},
            }
        )
        + "\n"
    )
    info = json.loads(stack.cli("submit", str(path), "--wait", "--json").stdout)
    assert info["status"] == "completed" and info["counts"]["succeeded"] == 1
    log = (stack.home / "worker-w1.log").read_text()
    assert "rejecting undecodable message (application/x-python-serialize" in log
    assert "rejecting malformed message" in log and "unexpected task 'os.system'" in log
    assert redis_client.llen("bigmodel.model.gen") == 0
    assert all(p.poll() is None for p in stack.workers)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_high_priority_overtakes_a_low_priority_backlog(stack):
    bulk = stack.home / "bulk.jsonl"
    bulk.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"b{i}",
                    "model": "gen",
                    "input": {"prompt": "Hello"},
                    "params": {"max_new_tokens": 60},
                }
            )
            + "\n"
            for i in range(200)
        )
    )
    one = stack.home / "one.jsonl"
    one.write_text(
        json.dumps(
            {
                "custom_id": "vip",
                "model": "gen",
                "input": {"prompt": "Hi"},
                "params": {"max_new_tokens": 4},
            }
        )
        + "\n"
    )
    stack.start_worker("gen", extra=("--max-batch-size", "4"))
    low = stack.cli("submit", str(bulk), "--priority", "low").stdout.strip()
    deadline = time.monotonic() + 120
    while stack.cli_json("status", low)["counts"]["succeeded"] < 4:
        assert time.monotonic() < deadline
    high = json.loads(
        stack.cli("submit", str(one), "--priority", "high", "--wait", "--json").stdout
    )
    assert high["status"] == "completed" and high["priority"] == "high"
    backlog = stack.cli_json("status", low)
    assert backlog["priority"] == "low"
    # Served ahead of the backlog, not after it.
    assert backlog["status"] == "in_progress" and backlog["counts"]["queued"] >= 40, backlog
    assert stack.wait_final(low)["counts"]["succeeded"] == 200


def _client(stack):
    from bigmodel.core.settings import Settings
    from producer.api import Client

    return Client(
        Settings(
            home=stack.home / "home",
            broker_url=stack.env["BIGMODEL_BROKER_URL"],
            database_url=stack.env["BIGMODEL_DATABASE_URL"],
            storage_url=stack.env["BIGMODEL_STORAGE_URL"],
            s3_endpoint_url=stack.env["BIGMODEL_S3_ENDPOINT_URL"],
        )
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_high_priority_runs_right_after_the_batch_on_the_model(stack):
    """A worker runs 400 ms batches of low-priority bulk work, one running and the next one
    prepared, with more prefetched. A high-priority request jumps all of them: the prepared batch
    waits, and at most the batch already on the model finishes between its submission and its
    result (not the two or three that were claimed or prefetched ahead of it)."""
    client = _client(stack)
    try:
        client.register_model("slow", "null:delay_ms=400", task="generate", batch_size=4)
        stack.start_worker("slow", extra=("--max-batch-size", "4"))
        bulk = [
            {"custom_id": f"b{i}", "model": "slow", "input": {"prompt": "x"}} for i in range(240)
        ]
        low = client.submit(bulk, priority="low")
        ahead = []
        for probe in range(3):
            deadline = time.monotonic() + 60
            while client.status(low.id).counts["succeeded"] < 8 * (probe + 1):
                assert time.monotonic() < deadline, "the bulk work does not progress"
                time.sleep(0.05)
            high = client.submit(
                [{"custom_id": "vip", "model": "slow", "input": {"prompt": "y"}}], priority="high"
            )
            assert client.wait(high.id, poll_s=0.05, timeout_s=60).status == "completed"
            (done,) = stack.sql("SELECT finished_at FROM requests WHERE batch_id = :b", b=high.id)[
                0
            ]
            # Requests of one batch are written with one finished_at.
            ahead.append(
                stack.sql(
                    "SELECT count(DISTINCT finished_at) FROM requests WHERE batch_id = :b "
                    "AND finished_at > :t0 AND finished_at < :t1",
                    b=low.id,
                    t0=high.created_at,
                    t1=done,
                )[0][0]
            )
        assert client.status(low.id).counts["queued"] > 0  # the backlog was there throughout
        # Typically 1; 2 only if it arrived while the batch on the model was being written.
        assert sum(ahead) / len(ahead) <= 1.5, ahead
    finally:
        client.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_single_requests_arriving_while_the_model_is_busy_form_one_batch(stack):
    """Ten one-request submissions arrive while the worker's model is busy for 2 s: the window
    (--max-wait-ms 20) closes long before the model frees up, yet they run as one batch rather
    than being cut into a small batch at 20 ms and the rest after it."""
    client = _client(stack)
    try:
        client.register_model("busy", "null:delay_ms=2000", task="generate")
        stack.start_worker("busy", extra=("--max-batch-size", "16", "--max-wait-ms", "20"))

        def one(custom_id: str) -> str:
            return client.submit(
                [{"custom_id": custom_id, "model": "busy", "input": {"prompt": "ping"}}]
            ).id

        # Two rounds: the first teaches the worker how long a batch takes.
        for round_ in range(2):
            first = one(f"first-{round_}")
            deadline = time.monotonic() + 60
            while client.status(first).counts["running"] == 0:
                assert time.monotonic() < deadline, "the first request never started"
                time.sleep(0.02)
            singles = [one(f"single-{round_}-{i}") for i in range(10)]
            for batch_id in [first, *singles]:
                assert client.wait(batch_id, timeout_s=60).status == "completed"
        claims = stack.sql(
            "SELECT count(DISTINCT started_at) FROM requests WHERE custom_id LIKE 'single-1-%'"
        )[0][0]
        assert claims == 1, f"the ten single requests ran in {claims} batches"
    finally:
        client.close()
