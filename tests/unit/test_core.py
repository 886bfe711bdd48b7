import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from bigmodel.broker import chunk_ids, chunk_message, parse_message, queue_name
from bigmodel.core.results import csv_header, csv_row, jsonl_line, record
from bigmodel.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_pure_core_and_producer_import_without_torch():
    """Producers install the core only: importing it must not pull torch or transformers."""
    code = (
        "import sys, bigmodel.core.requests, bigmodel.core.runner, bigmodel.core.results, "
        "bigmodel.core.settings, bigmodel.core.status\n"
        "heavy = {'torch', 'transformers', 'torchvision', 'sqlalchemy', 'celery', 'boto3',"
        " 'redis'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        "import producer, producer.cli, bigmodel.ledger.repo, bigmodel.broker, bigmodel.storage\n"
        "assert not {'torch', 'transformers', 'torchvision', 'workers'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_core_install_does_not_pull_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.startswith(("torch", "transformers"))]
    worker = meta["optional-dependencies"]["worker"]
    assert "torch==2.14.1" in worker and "torchvision==0.29.1" in worker


def test_settings_defaults_are_embedded_and_urls_normalised(tmp_path):
    s = Settings(home=tmp_path)
    assert s.embedded and s.broker == "filesystem://"
    assert s.database == f"sqlite:///{tmp_path / 'bigmodel.db'}"
    assert s.storage == str(tmp_path / "storage")
    pg = Settings(database_url="postgresql://u@h/db")
    assert pg.database == "postgresql+psycopg://u@h/db" and not pg.embedded
    with pytest.raises(ValidationError, match="BIGMODEL_DATABASE_URL='mysql://x'"):
        Settings(database_url="mysql://x")


def test_message_format_and_chunking():
    msg = chunk_message("batch_1", "gen", [1, 2, 3])
    assert json.loads(json.dumps(msg)) == msg
    parsed = parse_message(msg)
    assert (parsed.batch_id, parsed.model, parsed.ids, parsed.priority, parsed.isolate) == (
        "batch_1",
        "gen",
        [1, 2, 3],
        "normal",
        False,
    )
    high = chunk_message("b", "gen", [1], priority="high", isolate=True)
    assert parse_message(high).priority == "high" and parse_message(high).isolate
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        parse_message({**high, "priority": "urgent"})
    with pytest.raises(ValueError, match="unsupported message"):
        parse_message({"v": 99})
    pairs = [(i, "a" if i % 3 else "b") for i in range(1, 11)]
    chunks = chunk_ids(pairs, {"a": 3, "b": 2})
    assert chunks == [("a", [1, 2, 4]), ("a", [5, 7, 8]), ("a", [10]), ("b", [3, 6]), ("b", [9])]
    assert queue_name("gen") == "bigmodel.model.gen"
    assert queue_name("gen", "high") == "bigmodel.model.gen:high"
    assert queue_name("gen.low") != queue_name("gen", "low")
    with pytest.raises(ValueError, match="use one of high, normal, low"):
        queue_name("gen", "urgent")


def test_result_records_and_csv():
    ok = record("a", "succeeded", {"labels": [{"label": "çat"}]}, None, None)
    bad = record("b,1", "failed", None, "image_decode_failed", "cannot decode")
    assert ok["error"] is None
    assert bad["error"] == {"code": "image_decode_failed", "message": "cannot decode"}
    assert json.loads(jsonl_line(ok)) == ok and "çat" in jsonl_line(ok)
    assert csv_header() == "custom_id,status,output,error\r\n"
    assert csv_row(bad).startswith('"b,1",failed,,"{""code""')
