"""The repository: every read and write producers and workers make to the ledger.

Writes are guarded by status so that they are idempotent: a request is claimed only while
`queued`, a result is written only while it is `running`, and a batch becomes final only once.
Redeliveries of a message therefore change nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from bigmodel.core.errors import BATCH_CANCELLED, ConfigError, NotFound
from bigmodel.core.requests import ModelRef, RequestSpec
from bigmodel.core.runner import Item
from bigmodel.core.status import (
    BATCH_FINAL,
    COUNT_KEYS,
    REQUEST_OPEN,
    BatchStatus,
    RequestStatus,
    Task,
)
from bigmodel.ledger.db import make_sessionmaker
from bigmodel.ledger.models import BatchRow, ModelRow, RequestRow, utcnow

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_INSERT_CHUNK = 5000


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    task: Task
    source: str
    arch: str | None
    batch_size: int
    options: dict[str, Any]
    created_at: datetime

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.task, self.version)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": str(self.task),
            "source": self.source,
            "arch": self.arch,
            "batch_size": self.batch_size,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class BatchInfo:
    id: str
    status: BatchStatus
    counts: dict[str, int]
    created_at: datetime
    finished_at: datetime | None
    input_key: str | None
    output_key: str | None
    errors_key: str | None
    priority: str = "normal"
    expires_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.status in BATCH_FINAL

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": str(self.status),
            "counts": self.counts,
            "priority": self.priority,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "input_key": self.input_key,
            "output_key": self.output_key,
            "errors_key": self.errors_key,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


@dataclass(frozen=True)
class Claimed:
    batch_id: str
    item: Item
    attempts: int


@dataclass(frozen=True)
class Finished:
    """A request's final result as a worker reports it."""

    id: int
    status: RequestStatus
    output: dict[str, Any] | None = None
    output_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class ResultRow:
    line: int
    custom_id: str
    status: str
    output: dict[str, Any] | None
    output_key: str | None
    error_code: str | None
    error_message: str | None


@contextmanager
def _driver_errors(raw, statement: str) -> Iterator[None]:
    """Raise the driver's errors as SQLAlchemy's own (DataError, IntegrityError, ...), as the
    ORM paths do, for the statements we send straight to psycopg."""
    try:
        yield
    except raw.Error as exc:
        raise DBAPIError.instance(statement, None, exc, type(raw).Error) from exc


def _model_info(row: ModelRow) -> ModelInfo:
    return ModelInfo(
        row.name,
        row.version,
        Task(row.task),
        row.source,
        row.arch,
        row.batch_size,
        dict(row.options or {}),
        row.created_at,
    )


class Ledger:
    def __init__(self, engine: Engine, *, tenant: str = "default") -> None:
        self.engine = engine
        self.tenant = tenant
        self.Session = make_sessionmaker(engine)

    # -- models -------------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        *,
        task: Task | str,
        source: str,
        arch: str | None = None,
        batch_size: int = 32,
        options: dict[str, Any] | None = None,
    ) -> ModelInfo:
        """Register `name` at the next version (1 for a new name)."""
        if not MODEL_NAME.match(name):
            raise ConfigError(
                f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)"
            )
        if not 1 <= batch_size <= 4096:
            raise ConfigError(f"batch size {batch_size}: must be between 1 and 4096")
        task = Task(task)
        for _ in range(3):
            with self.Session.begin() as s:
                latest = s.scalar(
                    select(func.max(ModelRow.version)).where(
                        ModelRow.tenant == self.tenant, ModelRow.name == name
                    )
                )
                row = ModelRow(
                    tenant=self.tenant,
                    name=name,
                    version=(latest or 0) + 1,
                    task=str(task),
                    source=source,
                    arch=arch,
                    batch_size=batch_size,
                    options=options or {},
                )
                try:
                    s.add(row)
                    s.flush()
                except IntegrityError:  # a concurrent register took the version: try the next
                    s.rollback()
                    continue
                return _model_info(row)
        raise ConfigError(f"could not register {name!r}: concurrent registrations")

    def list_models(self) -> list[ModelInfo]:
        """The latest version of every model name."""
        with self.Session() as s:
            rows = s.scalars(
                select(ModelRow)
                .where(ModelRow.tenant == self.tenant)
                .order_by(ModelRow.name, ModelRow.version)
            ).all()
        latest: dict[str, ModelInfo] = {}
        for row in rows:
            latest[row.name] = _model_info(row)
        return list(latest.values())

    def get_model(self, name: str, version: int | None = None) -> ModelInfo:
        with self.Session() as s:
            q = select(ModelRow).where(ModelRow.tenant == self.tenant, ModelRow.name == name)
            q = q.where(ModelRow.version == version) if version else q
            row = s.scalars(q.order_by(ModelRow.version.desc()).limit(1)).first()
        if row is None:
            known = ", ".join(m.name for m in self.list_models()) or "none registered"
            raise NotFound(
                f"model {name!r} is not registered (known: {known}); "
                "register it with `bigmodel models register`"
            )
        return _model_info(row)

    def model_refs(self) -> dict[str, ModelRef]:
        return {m.name: m.ref for m in self.list_models()}

    # -- submission ---------------------------------------------------------------------------

    def create_batch(
        self,
        batch_id: str,
        specs: Sequence[RequestSpec],
        *,
        input_key: str | None,
        versions: dict[str, int],
        metadata: dict[str, Any] | None = None,
        priority: str = "normal",
        expires_at: datetime | None = None,
        created_at: datetime | None = None,
    ) -> list[tuple[int, str]]:
        """Insert the batch and all its request rows in one transaction.

        Returns `(request_id, model)` in submission order, for enqueueing.
        """
        now = created_at or utcnow()
        with self.Session.begin() as s:
            s.add(
                BatchRow(
                    id=batch_id,
                    tenant=self.tenant,
                    status=str(BatchStatus.QUEUED),
                    priority=priority,
                    total=len(specs),
                    input_key=input_key,
                    metadata_=metadata or {},
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            s.flush()
            if s.bind.dialect.name == "postgresql":
                ids = self._copy_requests(s, batch_id, specs, versions, now)
            else:
                ids = self._insert_requests(s, batch_id, specs, versions, now)
        return [(rid, sp.model) for rid, sp in zip(ids, specs, strict=True)]

    def _insert_requests(self, s, batch_id, specs, versions, now) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(specs), _INSERT_CHUNK):
            rows = [
                {
                    "batch_id": batch_id,
                    "tenant": self.tenant,
                    "line": sp.line,
                    "custom_id": sp.custom_id,
                    "model": sp.model,
                    "model_version": versions.get(sp.model, 1),
                    "task": str(sp.task),
                    "input": sp.input,
                    "params": sp.params,
                    "status": str(RequestStatus.QUEUED),
                    "attempts": 0,
                    "created_at": now,
                }
                for sp in specs[start : start + _INSERT_CHUNK]
            ]
            stmt = insert(RequestRow).returning(RequestRow.id, sort_by_parameter_order=True)
            ids.extend(s.scalars(stmt, rows).all())
        return ids

    def _copy_requests(self, s, batch_id, specs, versions, now) -> list[int]:
        """PostgreSQL: ids from the sequence, rows through COPY (several times faster than a
        multi-row INSERT, whose statement text alone psycopg spends most of the time on)."""
        raw = s.connection().connection.driver_connection
        ids = [
            r[0]
            for r in raw.execute(
                "SELECT nextval(pg_get_serial_sequence('requests', 'id')) "
                "FROM generate_series(1, %s)",
                (len(specs),),
            ).fetchall()
        ]
        cols = (
            "id, batch_id, tenant, line, custom_id, model, model_version, task, input, "
            "params, status, attempts, created_at"
        )
        queued = str(RequestStatus.QUEUED)
        statement = f"COPY requests ({cols}) FROM STDIN"
        with _driver_errors(raw, statement), raw.cursor().copy(statement) as copy:
            for rid, sp in zip(ids, specs, strict=True):
                copy.write_row(
                    (
                        rid,
                        batch_id,
                        self.tenant,
                        sp.line,
                        sp.custom_id,
                        sp.model,
                        versions.get(sp.model, 1),
                        str(sp.task),
                        json.dumps(sp.input, ensure_ascii=False),
                        json.dumps(sp.params, ensure_ascii=False),
                        queued,
                        0,
                        now,
                    )
                )
        return ids

    # -- worker side --------------------------------------------------------------------------

    def claim(self, ids: Sequence[int], *, worker: str, lease_s: float = 120.0) -> list[Claimed]:
        """Move the still-queued requests among `ids` to running; return them with their batch.

        Requests already claimed, finished or cancelled are left alone, so a redelivered message
        claims nothing.
        """
        if not ids:
            return []
        now = utcnow()
        t = RequestRow.__table__
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(t)
                .where(t.c.id.in_(list(ids)), t.c.status == str(RequestStatus.QUEUED))
                .values(
                    status=str(RequestStatus.RUNNING),
                    attempts=t.c.attempts + 1,
                    started_at=now,
                    worker=worker,
                    lease_until=now + timedelta(seconds=lease_s),
                )
                .returning(t.c.id, t.c.batch_id, t.c.input, t.c.params, t.c.attempts)
            ).all()
            batch_ids = {r.batch_id for r in rows}
            if batch_ids:
                b = BatchRow.__table__
                conn.execute(
                    update(b)
                    .where(b.c.id.in_(batch_ids), b.c.status == str(BatchStatus.QUEUED))
                    .values(status=str(BatchStatus.IN_PROGRESS), started_at=now)
                )
        order = {rid: i for i, rid in enumerate(ids)}
        rows = sorted(rows, key=lambda r: order[r.id])
        return [
            Claimed(r.batch_id, Item(r.id, dict(r.input), dict(r.params or {})), r.attempts)
            for r in rows
        ]

    def release(self, ids: Sequence[int]) -> int:
        """Put running requests back to queued (a transient fault; they will be tried again)."""
        if not ids:
            return 0
        t = RequestRow.__table__
        with self.engine.begin() as conn:
            return conn.execute(
                update(t)
                .where(t.c.id.in_(list(ids)), t.c.status == str(RequestStatus.RUNNING))
                .values(status=str(RequestStatus.QUEUED), worker=None, lease_until=None)
            ).rowcount

    def extend(self, ids: Sequence[int], *, worker: str, lease_s: float) -> int:
        """Push the lease of this worker's running requests `lease_s` into the future."""
        if not ids:
            return 0
        t = RequestRow.__table__
        with self.engine.begin() as conn:
            return conn.execute(
                update(t)
                .where(
                    t.c.id.in_(list(ids)),
                    t.c.worker == worker,
                    t.c.status == str(RequestStatus.RUNNING),
                )
                .values(lease_until=utcnow() + timedelta(seconds=lease_s))
            ).rowcount

    def finish(self, results: Sequence[Finished]) -> int:
        """Write final results in one statement; only rows still `running` change.

        On PostgreSQL the whole batch is one `UPDATE ... FROM unnest(arrays)`; elsewhere one
        executemany statement.
        """
        if not results:
            return 0
        if self.engine.dialect.name == "postgresql":
            return self._finish_unnest(results)
        t = RequestRow.__table__
        stmt = (
            update(t)
            .where(t.c.id == bindparam("b_id"), t.c.status == str(RequestStatus.RUNNING))
            .values(
                status=bindparam("b_status"),
                output=bindparam("b_output"),
                output_key=bindparam("b_output_key"),
                error_code=bindparam("b_code"),
                error_message=bindparam("b_message"),
                finished_at=bindparam("b_now"),
                lease_until=None,
            )
        )
        now = utcnow()
        params = [
            {
                "b_id": r.id,
                "b_status": str(r.status),
                "b_output": r.output,
                "b_output_key": r.output_key,
                "b_code": r.error_code,
                "b_message": r.error_message,
                "b_now": now,
            }
            for r in results
        ]
        with self.engine.begin() as conn:
            return conn.execute(stmt, params).rowcount

    def _finish_unnest(self, results: Sequence[Finished]) -> int:
        from psycopg.types.json import Jsonb

        sql = (
            "UPDATE requests AS r SET status = v.status, output = v.output, "
            "output_key = v.output_key, error_code = v.code, error_message = v.message, "
            "finished_at = %s, lease_until = NULL "
            "FROM unnest(%s::bigint[], %s::text[], %s::jsonb[], %s::text[], %s::text[], "
            "%s::text[]) AS v(id, status, output, output_key, code, message) "
            "WHERE r.id = v.id AND r.status = 'running'"
        )
        params = (
            utcnow(),
            [r.id for r in results],
            [str(r.status) for r in results],
            [None if r.output is None else Jsonb(r.output) for r in results],
            [r.output_key for r in results],
            [r.error_code for r in results],
            [r.error_message for r in results],
        )
        with self.engine.begin() as conn:
            raw = conn.connection.driver_connection
            with _driver_errors(raw, sql):
                cur = raw.cursor()
                cur.execute(sql, params)
            return cur.rowcount

    # -- queries ------------------------------------------------------------------------------

    def _batch_row(self, s, batch_id: str) -> BatchRow:
        row = s.get(BatchRow, batch_id)
        if row is None or row.tenant != self.tenant:
            raise NotFound(f"batch {batch_id!r} not found")
        return row

    def counts(self, batch_id: str) -> dict[str, int]:
        with self.Session() as s:
            return self._counts(s, batch_id)

    def _counts(self, s, batch_id: str) -> dict[str, int]:
        counts = dict.fromkeys(COUNT_KEYS, 0)
        for status, n in s.execute(
            select(RequestRow.status, func.count())
            .where(RequestRow.batch_id == batch_id)
            .group_by(RequestRow.status)
        ):
            counts[status] = n
            counts["total"] += n
        return counts

    def get_batch(self, batch_id: str) -> BatchInfo:
        with self.Session() as s:
            row = self._batch_row(s, batch_id)
            return BatchInfo(
                row.id,
                BatchStatus(row.status),
                self._counts(s, batch_id),
                row.created_at,
                row.finished_at,
                row.input_key,
                row.output_key,
                row.errors_key,
                row.priority,
                row.expires_at,
            )

    def list_batches(self, *, limit: int = 20) -> list[BatchInfo]:
        with self.Session() as s:
            ids = s.scalars(
                select(BatchRow.id)
                .where(BatchRow.tenant == self.tenant)
                .order_by(BatchRow.created_at.desc())
                .limit(limit)
            ).all()
        return [self.get_batch(i) for i in ids]

    def iter_results(self, batch_id: str, *, page: int = 1000) -> Iterator[ResultRow]:
        """Every request of the batch in submission order, paged by line."""
        with self.Session() as s:
            self._batch_row(s, batch_id)
        last = 0
        cols = (
            RequestRow.line,
            RequestRow.custom_id,
            RequestRow.status,
            RequestRow.output,
            RequestRow.output_key,
            RequestRow.error_code,
            RequestRow.error_message,
        )
        while True:
            with self.Session() as s:
                rows = s.execute(
                    select(*cols)
                    .where(RequestRow.batch_id == batch_id, RequestRow.line > last)
                    .order_by(RequestRow.line)
                    .limit(page)
                ).all()
            if not rows:
                return
            for r in rows:
                yield ResultRow(*r)
            last = rows[-1].line

    def unfinished(self, batch_id: str) -> bool:
        """Whether any request of the batch is still queued or running (an index probe)."""
        with self.Session() as s:
            return s.scalar(
                select(
                    select(RequestRow.id)
                    .where(
                        RequestRow.batch_id == batch_id,
                        RequestRow.status.in_([str(st) for st in REQUEST_OPEN]),
                    )
                    .exists()
                )
            )

    # -- batch state --------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> int:
        """Cancel every queued request at once and mark the batch cancelling; return how many."""
        now = utcnow()
        with self.Session.begin() as s:
            row = self._batch_row(s, batch_id)
            if BatchStatus(row.status) in BATCH_FINAL:
                return 0
            n = s.execute(
                update(RequestRow)
                .where(
                    RequestRow.batch_id == batch_id, RequestRow.status == str(RequestStatus.QUEUED)
                )
                .values(
                    status=str(RequestStatus.CANCELLED),
                    error_code=BATCH_CANCELLED,
                    error_message="the batch was cancelled before this request ran",
                    finished_at=now,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            row.status = str(BatchStatus.CANCELLING)
            row.cancelled_at = now
        return n

    def mark_final(self, batch_id: str, *, output_key: str, errors_key: str) -> BatchStatus | None:
        """Move an unfinished batch to its final status once; None if another writer did."""
        with self.Session.begin() as s:
            row = s.get(BatchRow, batch_id, with_for_update=True)
            if row is None or BatchStatus(row.status) in BATCH_FINAL:
                return None
            if row.status == BatchStatus.CANCELLING:
                final = BatchStatus.CANCELLED
            elif self._counts(s, batch_id)["expired"]:
                final = BatchStatus.EXPIRED
            else:
                final = BatchStatus.COMPLETED
            row.status = str(final)
            row.output_key = output_key
            row.errors_key = errors_key
            row.finished_at = utcnow()
            return final
