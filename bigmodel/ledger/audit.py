"""`bigmodel audit`: does a batch's input, ledger and output files agree?

- lost: a request of the submitted file that is missing from the ledger, still unfinished in a
  final batch, or missing from the final output files;
- doubled: a custom_id present more than once in the output files (or in both);
- mismatched: an output-file record whose status or result differs from the ledger.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from bigmodel.core.errors import PermanentError
from bigmodel.core.status import REQUEST_FINAL
from bigmodel.ledger.finalize import iter_records
from bigmodel.ledger.repo import Ledger
from bigmodel.storage import Storage


@dataclass
class Audit:
    batch_id: str
    status: str
    submitted: int
    in_ledger: int
    final: int
    lost: int
    doubled: int
    mismatched: int
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.mismatched)

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _jsonl(storage: Storage, key: str | None) -> list[dict]:
    if not key:
        return []
    try:
        return [json.loads(x) for x in storage.get(key).decode("utf-8").splitlines() if x]
    except PermanentError:
        return []


def audit_batch(ledger: Ledger, storage: Storage, batch_id: str) -> Audit:
    info = ledger.get_batch(batch_id)
    records = {r["custom_id"]: r for r in iter_records(ledger, storage, batch_id)}
    submitted = []
    if info.input_key:
        for line in storage.get(info.input_key).decode("utf-8-sig").splitlines():
            if line.strip():
                submitted.append(json.loads(line)["custom_id"])
    lost_ids = [c for c in submitted if c not in records]
    unfinished = [c for c, r in records.items() if r["status"] not in REQUEST_FINAL]
    if info.is_final:
        lost_ids += unfinished
    files = _jsonl(storage, info.output_key) + _jsonl(storage, info.errors_key)
    seen = Counter(r["custom_id"] for r in files)
    doubled = [c for c, n in seen.items() if n > 1]
    mismatched = []
    if info.is_final:
        lost_ids += [c for c in records if c not in seen and c not in lost_ids]
        mismatched = [r["custom_id"] for r in files if records.get(r["custom_id"]) != r]
    return Audit(
        batch_id=batch_id,
        status=str(info.status),
        submitted=len(submitted),
        in_ledger=len(records),
        final=len(records) - len(unfinished),
        lost=len(lost_ids),
        doubled=len(doubled),
        mismatched=len(mismatched),
        examples={
            k: v[:10]
            for k, v in (("lost", lost_ids), ("doubled", doubled), ("mismatched", mismatched))
            if v
        },
    )
