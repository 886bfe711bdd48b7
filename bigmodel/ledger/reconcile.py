"""The reconciler: makes the broker and the batches agree with the ledger again.

Runs periodically inside workers and on demand as `bigmodel reconcile`. Each pass:
1. expires batches past their completion window;
2. sends back to the queue the running requests whose lease expired (their worker died), one
   request per message so a poison request runs alone, and fails with `poison` those that have
   used up their attempts;
3. re-enqueues queued requests that the broker no longer holds (Redis restarted or flushed);
4. finishes batches that have nothing left to run (a worker died between its last result and
   the batch's output files), once their last request has been final for the lost grace
   period: before that, the worker that finished it is still writing the files (a worker's
   finalizer may run seconds behind when thousands of tiny batches finish at once).
Everything it does is idempotent; duplicated messages are harmless because a request is only
claimed while queued.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from celery import Celery

from bigmodel.broker import chunk_ids, chunk_message, enqueue, queue_name
from bigmodel.broker.inspect import ids_in_broker
from bigmodel.core.settings import Settings
from bigmodel.ledger.finalize import finalize_batch
from bigmodel.ledger.recovery import (
    Requeued,
    cutoff,
    expire_due,
    queued_requests,
    requeue_expired_leases,
    unfinished_batches_without_work,
)
from bigmodel.ledger.repo import Ledger
from bigmodel.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Report:
    expired: dict[str, int] = field(default_factory=dict)
    lease_requeued: int = 0
    poisoned: int = 0
    lost_requeued: int = 0
    finalized: list[str] = field(default_factory=list)
    broker_inspected: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def changed(self) -> bool:
        return bool(
            self.expired
            or self.lease_requeued
            or self.poisoned
            or self.lost_requeued
            or self.finalized
        )


def _send(app: Celery, reqs: Sequence[Requeued], *, size: int | None) -> None:
    """Enqueue requests grouped by batch, model and priority; `size=1` isolates each."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for r in reqs:
        groups.setdefault((r.batch_id, r.priority), []).append((r.id, r.model))
    messages = []
    for (batch_id, priority), pairs in groups.items():
        sizes = {model: size or 64 for _, model in pairs}
        for model, ids in chunk_ids(pairs, sizes):
            messages.append(
                (
                    queue_name(model, priority),
                    chunk_message(batch_id, model, ids, priority=priority, isolate=size == 1),
                )
            )
    if messages:
        enqueue(app, messages)


def reconcile(
    ledger: Ledger,
    storage: Storage,
    app: Celery,
    settings: Settings,
    *,
    lost_grace_s: float | None = None,
) -> Report:
    report = Report()
    report.expired = expire_due(ledger)
    back, poisoned = requeue_expired_leases(ledger, max_attempts=settings.max_attempts)
    report.poisoned = len(poisoned)
    _send(app, back, size=1)
    report.lease_requeued = len(back)

    grace = settings.lost_grace_s if lost_grace_s is None else lost_grace_s
    candidates = list(queued_requests(ledger, older_than=cutoff(grace)))
    if candidates:
        # A message a worker has held unacknowledged for a lease without claiming it was most
        # likely prefetched by a worker that died: count its requests as lost.
        present = ids_in_broker(
            app, {r.model for r in candidates}, stale_unacked_s=max(settings.lease_s, grace)
        )
        if present is None:
            report.broker_inspected = False
        else:
            lost = [r for r in candidates if r.id not in present]
            _send(app, lost, size=None)
            report.lost_requeued = len(lost)

    stuck = unfinished_batches_without_work(ledger, finished_before=cutoff(grace))
    for batch_id in set(report.expired) | set(stuck):
        if finalize_batch(ledger, storage, batch_id) is not None:
            report.finalized.append(batch_id)
    if report.changed:
        log.warning("reconciled: %s", report.as_dict())
    return report
