"""Reading results (with outputs kept in storage) and finishing a batch."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from bigmodel.core.results import is_success, record, to_jsonl
from bigmodel.core.status import BatchStatus
from bigmodel.ledger.repo import Ledger, ResultRow
from bigmodel.storage import Storage, batch_key

log = logging.getLogger(__name__)


def load_record(row: ResultRow, storage: Storage) -> dict[str, Any]:
    output = row.output
    if row.output_key is not None:
        output = json.loads(storage.get(row.output_key))
    return record(row.custom_id, row.status, output, row.error_code, row.error_message)


def iter_records(ledger: Ledger, storage: Storage, batch_id: str) -> Iterator[dict[str, Any]]:
    for row in ledger.iter_results(batch_id):
        yield load_record(row, storage)


def finalize_batch(ledger: Ledger, storage: Storage, batch_id: str) -> BatchStatus | None:
    """If every request of the batch is final, write its files and make the batch final.

    The files are written before the status changes, so a final batch always has them. Two
    workers may both get here; both write the same bytes (the content is a function of the final
    ledger rows), and only one of them flips the status.
    """
    if ledger.unfinished(batch_id):
        return None
    ok: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for rec in iter_records(ledger, storage, batch_id):
        (ok if is_success(rec) else bad).append(rec)
    output_key = batch_key(ledger.tenant, batch_id, "output.jsonl")
    errors_key = batch_key(ledger.tenant, batch_id, "errors.jsonl")
    storage.put(output_key, to_jsonl(ok), content_type="application/jsonl")
    storage.put(errors_key, to_jsonl(bad), content_type="application/jsonl")
    final = ledger.mark_final(batch_id, output_key=output_key, errors_key=errors_key)
    if final is not None:
        log.info("batch %s %s: %d succeeded, %d not", batch_id, final, len(ok), len(bad))
    return final
