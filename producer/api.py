"""The Python API: submit, status, wait, results, cancel; and the model registry.

from producer import Client
client = Client()                     # settings from BIGMODEL_* variables
batch = client.submit("requests.jsonl")
client.wait(batch.id, progress=lambda b: print(b.counts))
for record in client.results(batch.id):
    ...
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from bigmodel.broker import chunk_ids, chunk_message, enqueue, make_celery, queue_name
from bigmodel.core.batching import PRIORITIES
from bigmodel.core.errors import BigModelError, LineError, SubmissionRejected
from bigmodel.core.requests import parse_submission
from bigmodel.core.settings import Settings, get_settings
from bigmodel.core.status import COUNT_KEYS, BatchStatus, RequestStatus
from bigmodel.ledger.audit import Audit, audit_batch
from bigmodel.ledger.db import make_engine, require_schema, upgrade
from bigmodel.ledger.finalize import finalize_batch, iter_records
from bigmodel.ledger.models import utcnow
from bigmodel.ledger.reconcile import Report, reconcile
from bigmodel.ledger.repo import BatchInfo, Ledger, ModelInfo
from bigmodel.storage import Storage, batch_key, open_storage

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_window(value: str | timedelta) -> timedelta:
    """`"24h"`, `"30m"`, `"90s"`, `"7d"` (or a timedelta) -> timedelta, between 1 s and 30 d."""
    if isinstance(value, timedelta):
        window = value
    else:
        m = _WINDOW.match(str(value))
        if not m:
            raise ValueError(
                f"completion window {value!r}: use a number and a unit, e.g. 24h, 30m, 90s or 7d"
            )
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        window = timedelta(**{unit: float(m.group(1))})
    if not timedelta(seconds=1) <= window <= timedelta(days=30):
        raise ValueError(f"completion window {value!r}: must be between 1s and 30d")
    return window


class Client:
    """Talks to the ledger, storage and broker named by the settings (embedded by default)."""

    def __init__(self, settings: Settings | None = None, *, check_schema: bool = True) -> None:
        self.settings = settings or get_settings()
        self.engine = make_engine(self.settings.database)
        if self.settings.embedded and self.settings.database_url is None:
            upgrade(self.engine)  # the embedded SQLite file migrates itself
        elif check_schema:
            require_schema(self.engine)
        self.ledger = Ledger(self.engine, tenant=self.settings.tenant)

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings.storage, endpoint_url=self.settings.s3_endpoint_url)

    @cached_property
    def celery(self):
        return make_celery(self.settings)

    def close(self) -> None:
        self.engine.dispose()

    # -- models -------------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        source: str,
        *,
        task: str,
        arch: str | None = None,
        batch_size: int | None = None,
    ) -> ModelInfo:
        from bigmodel.models.registry import check_registration

        task, source, arch, size = check_registration(
            name, source, task=task, arch=arch, batch_size=batch_size
        )
        return self.ledger.register_model(
            name, task=task, source=source, arch=arch, batch_size=size
        )

    def models(self) -> list[ModelInfo]:
        return self.ledger.list_models()

    # -- submission ---------------------------------------------------------------------------

    def submit(
        self,
        source: str | Path | bytes | Iterable[Mapping[str, Any]],
        *,
        metadata: dict[str, Any] | None = None,
        priority: str = "normal",
        completion_window: str | timedelta | None = None,
    ) -> BatchInfo:
        """Submit a JSONL file (path or bytes) or an iterable of request dicts.

        Every line is validated first; any bad line raises `SubmissionRejected` listing each bad
        line, and nothing is stored or enqueued. Then the input file is stored, the ledger rows
        are written in one transaction, and only then are chunks enqueued.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"priority {priority!r}: use one of {', '.join(PRIORITIES)}")
        window = parse_window(completion_window) if completion_window is not None else None
        data = self._read(source)
        models = self.ledger.list_models()
        specs = parse_submission(
            data.splitlines(),
            {m.name: m.ref for m in models},
            max_requests=self.settings.max_requests_per_batch,
            max_line_bytes=self.settings.max_line_bytes,
        )
        batch_id = "batch_" + uuid.uuid4().hex
        input_key = batch_key(self.settings.tenant, batch_id, "input.jsonl")
        self.storage.put(input_key, data, content_type="application/jsonl")
        now = utcnow()
        expires_at = now + window if window is not None else None
        pairs = self.ledger.create_batch(
            batch_id,
            specs,
            input_key=input_key,
            metadata=metadata,
            priority=priority,
            versions={m.name: m.version for m in models},
            expires_at=expires_at,
            created_at=now,
        )
        sizes = {m.name: m.batch_size for m in models}
        # Chunks of prompts of similar length: a chunk becomes a batch, and a batch is padded
        # to its longest prompt. (A stable sort: images keep their order.)
        order = sorted(range(len(specs)), key=lambda i: len(specs[i].input.get("prompt", "")))
        pairs = [pairs[i] for i in order]
        messages = [
            (queue_name(model, priority), chunk_message(batch_id, model, ids, priority=priority))
            for model, ids in chunk_ids(pairs, sizes)
        ]
        try:
            enqueue(self.celery, messages)
        except Exception as exc:
            self._fail_unsent(batch_id, exc)
            raise BigModelError(
                f"batch {batch_id} was recorded but could not be enqueued ({exc}); "
                "it has been marked failed, nothing will run: submit it again"
            ) from exc
        # The batch as committed (no second query: single-request submissions are frequent).
        counts = dict.fromkeys(COUNT_KEYS, 0)
        counts["total"] = counts[str(RequestStatus.QUEUED)] = len(specs)
        return BatchInfo(
            batch_id,
            BatchStatus.QUEUED,
            counts,
            now,
            None,
            input_key,
            None,
            None,
            priority,
            expires_at,
        )

    def _read(self, source: str | Path | bytes | Iterable[Mapping[str, Any]]) -> bytes:
        limit = self.settings.max_file_bytes
        if isinstance(source, bytes):
            data = source
        elif isinstance(source, str | Path):
            path = Path(source)
            if not path.is_file():
                raise BigModelError(f"{path}: no such file")
            if path.stat().st_size > limit:
                raise SubmissionRejected(
                    [
                        LineError(
                            0,
                            f"the file is {path.stat().st_size} bytes, over the limit of "
                            f"{limit}; split it into several batches",
                        )
                    ],
                    total_lines=0,
                )
            data = path.read_bytes()
        else:
            lines = []
            for n, rec in enumerate(source, start=1):
                try:
                    lines.append(json.dumps(rec, ensure_ascii=False))
                except (TypeError, ValueError) as exc:
                    raise SubmissionRejected(
                        [LineError(n, f"not JSON-serialisable: {exc}")], total_lines=n
                    ) from None
            data = ("\n".join(lines) + "\n").encode("utf-8")
        if len(data) > limit:
            raise SubmissionRejected(
                [LineError(0, f"the submission is {len(data)} bytes, over the limit of {limit}")],
                total_lines=0,
            )
        return data

    def _fail_unsent(self, batch_id: str, exc: Exception) -> None:
        from sqlalchemy import update

        from bigmodel.ledger.models import BatchRow, RequestRow

        with self.ledger.Session.begin() as s:
            s.execute(
                update(RequestRow)
                .where(
                    RequestRow.batch_id == batch_id, RequestRow.status == str(RequestStatus.QUEUED)
                )
                .values(
                    status=str(RequestStatus.FAILED),
                    error_code="enqueue_failed",
                    error_message=f"the broker was unreachable at submit: {exc}",
                )
            )
            s.execute(
                update(BatchRow)
                .where(BatchRow.id == batch_id)
                .values(status=str(BatchStatus.FAILED))
            )

    # -- queries ------------------------------------------------------------------------------

    def status(self, batch_id: str) -> BatchInfo:
        return self.ledger.get_batch(batch_id)

    def batches(self, *, limit: int = 20) -> list[BatchInfo]:
        return self.ledger.list_batches(limit=limit)

    def wait(
        self,
        batch_id: str,
        *,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        progress: Callable[[BatchInfo], None] | None = None,
    ) -> BatchInfo:
        """Poll until the batch is final; call `progress` with each status seen."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.status(batch_id)
            if progress is not None:
                progress(info)
            if info.is_final:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {info.status} after {timeout_s}s")
            time.sleep(poll_s)

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """One record per request, in submission order: custom_id, status, output, error."""
        return iter_records(self.ledger, self.storage, batch_id)

    def audit(self, batch_id: str) -> Audit:
        """Lost, doubled and mismatched counts between input file, ledger and output files."""
        return audit_batch(self.ledger, self.storage, batch_id)

    def reconcile(self, *, lost_grace_s: float | None = None) -> Report:
        """One reconciler pass (workers also run it periodically)."""
        return reconcile(
            self.ledger, self.storage, self.celery, self.settings, lost_grace_s=lost_grace_s
        )

    def cancel(self, batch_id: str) -> BatchInfo:
        """Queued requests become cancelled now; running ones finish, then the batch ends."""
        self.ledger.cancel(batch_id)
        finalize_batch(self.ledger, self.storage, batch_id)
        return self.status(batch_id)
