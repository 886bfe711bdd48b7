"""Result records and their file formats (pure)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from bigmodel.core.status import RequestStatus

RECORD_FIELDS = ("custom_id", "status", "output", "error")


def record(
    custom_id: str,
    status: str,
    output: dict[str, Any] | None,
    error_code: str | None,
    error_message: str | None,
) -> dict[str, Any]:
    """One result record: `{"custom_id", "status", "output", "error"}`."""
    error = {"code": error_code, "message": error_message or ""} if error_code else None
    return {"custom_id": custom_id, "status": status, "output": output, "error": error}


def is_success(rec: dict[str, Any]) -> bool:
    return rec["status"] == RequestStatus.SUCCEEDED


def jsonl_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def to_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(jsonl_line(r) for r in records).encode("utf-8")


def csv_header() -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(RECORD_FIELDS)
    return buf.getvalue()


def csv_row(rec: dict[str, Any]) -> str:
    """CSV keeps `output` and `error` as JSON text in their cells."""
    buf = io.StringIO()
    csv.writer(buf).writerow(
        [
            rec["custom_id"],
            rec["status"],
            "" if rec["output"] is None else json.dumps(rec["output"], ensure_ascii=False),
            "" if rec["error"] is None else json.dumps(rec["error"], ensure_ascii=False),
        ]
    )
    return buf.getvalue()
