"""What a worker does with a batch of claimed work: run it, persist it, finish batches."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.exc import DataError

from bigmodel.broker import chunk_message, enqueue, queue_name, take_turn
from bigmodel.core.errors import INTERNAL_ERROR, RESULT_NOT_STORABLE
from bigmodel.core.runner import ItemResult, Prepared, RunLoop
from bigmodel.core.settings import Settings
from bigmodel.core.status import RequestStatus
from bigmodel.ledger.finalize import finalize_batch
from bigmodel.ledger.reconcile import reconcile
from bigmodel.ledger.repo import Claimed, Finished, Ledger
from bigmodel.storage import Storage, batch_key

log = logging.getLogger(__name__)


@dataclass
class Stats:
    items: int = 0
    batches: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0


class Runtime:
    """Owns the loaded models and the ledger/storage handles of one worker process."""

    def __init__(
        self,
        *,
        settings: Settings,
        ledger: Ledger,
        storage: Storage,
        app: Celery,
        loops: dict[str, RunLoop],
        worker_name: str,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.storage = storage
        self.app = app
        self.loops = loops
        self.worker_name = worker_name
        self.stats = Stats()
        self.delayed: list[tuple[float, str, dict]] = []
        # Writing a finished batch's files is off the critical path: results are already in
        # the ledger, and should this worker die first, the reconciler finishes the batch.
        self._finalizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finalize")
        self._finalizing: set[str] = set()
        self._lock = threading.Lock()

    def start(self, model: str, ids: Sequence[int]) -> tuple[list[Claimed], Prepared | None]:
        """Claim the still-queued requests among `ids` and decode them (I/O, any thread)."""
        claimed = self.ledger.claim(ids, worker=self.worker_name, lease_s=self.settings.lease_s)
        if not claimed:
            return claimed, None
        try:
            return claimed, self.loops[model].prepare([c.item for c in claimed])
        except Exception:
            self.abort(claimed)
            raise

    def compute(self, model: str, prepared: Prepared) -> list[ItemResult]:
        """Run the model (the one thread that touches it)."""
        return self.loops[model].execute(prepared)

    def finish(
        self,
        model: str,
        claimed: Sequence[Claimed],
        results: Sequence[ItemResult],
        *,
        priority: str = "normal",
    ) -> None:
        """Persist results, then finish the batches with nothing left to run.

        Raises on infrastructure faults (database, storage) after handing the requests back to
        `queued`; the caller must then not acknowledge their messages.
        """
        if claimed:
            try:
                self._persist(model, claimed, results, priority)
            except Exception:
                self.abort(claimed)
                raise
        self.schedule_finalize({c.batch_id for c in claimed})

    def schedule_finalize(self, batch_ids) -> None:
        """Finish these batches in the background if nothing is left to run in them."""
        with self._lock:
            new = sorted(set(batch_ids) - self._finalizing)
            self._finalizing.update(new)
        for batch_id in new:
            self._finalizer.submit(self._finalize, batch_id)

    def _finalize(self, batch_id: str) -> None:
        with self._lock:
            self._finalizing.discard(batch_id)
        try:
            finalize_batch(self.ledger, self.storage, batch_id)
        except Exception:
            log.exception("finishing batch %s failed; the reconciler will try again", batch_id)

    def close(self) -> None:
        """Wait for the batch files still being written."""
        self._finalizer.shutdown(wait=True)

    def abort(self, claimed: Sequence[Claimed]) -> None:
        """Hand claimed requests back so the redelivered messages can claim them again."""
        try:
            self.ledger.release([c.item.id for c in claimed])
        except Exception:
            log.exception("could not release %d claimed requests", len(claimed))

    def _persist(
        self, model: str, claimed: Sequence[Claimed], results: Sequence[ItemResult], priority: str
    ) -> None:
        by_id = {c.item.id: c for c in claimed}
        final: list[Finished] = []
        retry: list[int] = []
        delay_s = 0.0
        for res in results:
            c = by_id[res.id]
            if res.retry_after_s is not None and c.attempts < self.settings.max_attempts:
                retry.append(res.id)
                # Exponential backoff: the suggested pause doubles with every attempt.
                delay_s = max(delay_s, res.retry_after_s * 2 ** (c.attempts - 1))
            elif res.ok:
                final.append(self._success(c, res))
            else:
                err = res.error or {"code": INTERNAL_ERROR, "message": "no result"}
                final.append(
                    Finished(
                        res.id,
                        RequestStatus.FAILED,
                        error_code=err["code"],
                        error_message=err["message"],
                    )
                )
        self._finish(final)
        self.stats.items += len(results)
        self.stats.batches += 1
        self.stats.succeeded += sum(f.status == RequestStatus.SUCCEEDED for f in final)
        self.stats.failed += sum(f.status == RequestStatus.FAILED for f in final)
        if retry:
            # A transient fault (storage down, a URL timing out): back to queued now, re-sent
            # after a pause without blocking the worker; the attempt count bounds it. Should the
            # worker die before re-sending, the requests are queued in the ledger for the
            # reconciler.
            self.stats.retried += len(retry)
            log.warning("%d requests hit a transient fault; retrying in %.1fs", len(retry), delay_s)
            self.ledger.release(retry)
            groups: dict[str, list[int]] = {}
            for rid in retry:
                groups.setdefault(by_id[rid].batch_id, []).append(rid)
            due = time.monotonic() + min(delay_s, 60.0)
            for b, rids in groups.items():
                self.delayed.append(
                    (
                        due,
                        queue_name(model, priority),
                        chunk_message(b, model, rids, priority=priority),
                    )
                )

    def extend_leases(self, ids: Sequence[int]) -> None:
        self.ledger.extend(ids, worker=self.worker_name, lease_s=self.settings.lease_s)

    def reconcile(self):
        """One pass of the reconciler, if it is this worker's turn: each pass reads every
        queued request, so the workers on one broker take turns (one pass per interval)."""
        turn = self.settings.reconcile_interval_s * 0.9  # this worker may take the next one too
        if not take_turn(self.app, f"reconcile.{self.ledger.tenant}", turn):
            return None
        return reconcile(self.ledger, self.storage, self.app, self.settings)

    def publish_due(self, now: float | None = None) -> None:
        """Send the retries whose pause is over."""
        now = time.monotonic() if now is None else now
        due = [d for d in self.delayed if d[0] <= now]
        if not due:
            return
        enqueue(self.app, [(q, m) for _, q, m in due])
        self.delayed = [d for d in self.delayed if d[0] > now]

    def _finish(self, final: list[Finished]) -> None:
        """One statement for the batch; if the database refuses a value, isolate and fail it."""
        try:
            self.ledger.finish(final)
            return
        except DataError as exc:
            log.warning("bulk result write refused (%s); writing rows one by one", exc.orig)
        for f in final:
            try:
                self.ledger.finish([f])
            except DataError as exc:
                log.error("request %d: result not storable: %s", f.id, exc.orig)
                self.ledger.finish(
                    [
                        Finished(
                            f.id,
                            RequestStatus.FAILED,
                            error_code=RESULT_NOT_STORABLE,
                            error_message=f"the database refused the result: {str(exc.orig)[:500]}",
                        )
                    ]
                )

    def _success(self, c: Claimed, res: ItemResult) -> Finished:
        body = json.dumps(res.output, ensure_ascii=False, separators=(",", ":")).encode()
        if len(body) <= self.settings.inline_output_max_bytes:
            return Finished(res.id, RequestStatus.SUCCEEDED, output=res.output)
        key = batch_key(self.ledger.tenant, c.batch_id, f"outputs/{res.id}.json")
        self.storage.put(key, body, content_type="application/json")
        return Finished(res.id, RequestStatus.SUCCEEDED, output_key=key)
