"""Ledger queries for recovery: expired leases, lost messages, expired batches, stuck batches.

Every write is guarded by status (and lease time), so several reconcilers running at once, or a
reconciler racing a worker, change each request at most once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from bigmodel.core.errors import BATCH_EXPIRED, POISON
from bigmodel.core.status import BATCH_FINAL, REQUEST_OPEN, RequestStatus
from bigmodel.ledger.models import BatchRow, RequestRow, utcnow
from bigmodel.ledger.repo import Ledger

_UNFINISHED = [str(s) for s in REQUEST_OPEN]
_FINAL_BATCH = [str(s) for s in BATCH_FINAL]


@dataclass(frozen=True)
class Requeued:
    id: int
    batch_id: str
    model: str
    priority: str


def requeue_expired_leases(
    ledger: Ledger, *, max_attempts: int, now: datetime | None = None
) -> tuple[list[Requeued], list[int]]:
    """Running requests whose worker stopped renewing its lease (it died or hung).

    Those with attempts left go back to `queued` (returned, to be re-enqueued alone so that a
    poison request cannot take its batch-mates down again); those without fail with `poison`.
    """
    now = now or utcnow()
    t, b = RequestRow.__table__, BatchRow.__table__
    expired = (t.c.status == str(RequestStatus.RUNNING)) & (t.c.lease_until < now)
    with ledger.engine.begin() as conn:
        poisoned = (
            conn.execute(
                update(t)
                .where(expired, t.c.attempts >= max_attempts)
                .values(
                    status=str(RequestStatus.FAILED),
                    error_code=POISON,
                    lease_until=None,
                    error_message=f"the worker running this request stopped {max_attempts} "
                    "times; it is not tried again",
                    finished_at=now,
                )
                .returning(t.c.id)
            )
            .scalars()
            .all()
        )
        back = conn.execute(
            update(t)
            .where(expired, t.c.attempts < max_attempts)
            .values(status=str(RequestStatus.QUEUED), worker=None, lease_until=None)
            .returning(t.c.id, t.c.batch_id, t.c.model)
        ).all()
        priorities: dict[str, str] = {}
        if back:
            rows = conn.execute(
                select(b.c.id, b.c.priority).where(b.c.id.in_({r.batch_id for r in back}))
            ).all()
            priorities = {r.id: r.priority for r in rows}
    return (
        [Requeued(r.id, r.batch_id, r.model, priorities.get(r.batch_id, "normal")) for r in back],
        list(poisoned),
    )


def queued_requests(
    ledger: Ledger, *, older_than: datetime, page: int = 5000
) -> Iterator[Requeued]:
    """Queued requests of unfinished batches, submitted before `older_than`."""
    t, b = RequestRow.__table__, BatchRow.__table__
    last = 0
    while True:
        with ledger.engine.connect() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.batch_id, t.c.model, b.c.priority)
                .join(b, b.c.id == t.c.batch_id)
                .where(
                    t.c.status == str(RequestStatus.QUEUED),
                    t.c.id > last,
                    t.c.created_at < older_than,
                    b.c.tenant == ledger.tenant,
                    b.c.status.not_in(_FINAL_BATCH),
                )
                .order_by(t.c.id)
                .limit(page)
            ).all()
        if not rows:
            return
        for r in rows:
            yield Requeued(r.id, r.batch_id, r.model, r.priority)
        last = rows[-1].id


def expire_due(ledger: Ledger, *, now: datetime | None = None) -> dict[str, int]:
    """Batches past their completion window: every unfinished request becomes `expired`.

    A running request expires too; if its worker finishes it later, the guarded result write
    changes nothing. Returns `{batch_id: requests expired}`.
    """
    now = now or utcnow()
    t, b = RequestRow.__table__, BatchRow.__table__
    with ledger.engine.begin() as conn:
        due = (
            conn.execute(
                select(b.c.id).where(
                    b.c.expires_at < now,
                    b.c.status.not_in(_FINAL_BATCH),
                    b.c.tenant == ledger.tenant,
                )
            )
            .scalars()
            .all()
        )
        out = {}
        for batch_id in due:
            out[batch_id] = conn.execute(
                update(t)
                .where(t.c.batch_id == batch_id, t.c.status.in_(_UNFINISHED))
                .values(
                    status=str(RequestStatus.EXPIRED),
                    error_code=BATCH_EXPIRED,
                    error_message="the batch's completion window ended before this "
                    "request finished",
                    finished_at=now,
                    lease_until=None,
                )
            ).rowcount
    return out


def unfinished_batches_without_work(ledger: Ledger, *, finished_before: datetime) -> list[str]:
    """Batches not final although none of their requests is queued or running, and none
    finished at or after `finished_before` (until then, the worker that finished the last one
    is expected to write the batch's files itself)."""
    t, b = RequestRow.__table__, BatchRow.__table__
    open_work = select(t.c.id).where(t.c.batch_id == b.c.id, t.c.status.in_(_UNFINISHED))
    recent = select(t.c.id).where(t.c.batch_id == b.c.id, t.c.finished_at >= finished_before)
    with ledger.engine.connect() as conn:
        return list(
            conn.execute(
                select(b.c.id).where(
                    b.c.status.not_in(_FINAL_BATCH),
                    b.c.tenant == ledger.tenant,
                    ~open_work.exists(),
                    ~recent.exists(),
                )
            ).scalars()
        )


def cutoff(seconds: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) - timedelta(seconds=seconds)
