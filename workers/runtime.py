"""What a worker does with a batch of claimed work: run it, persist it, finish batches."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.exc import DataError

from bigmodel.broker import chunk_message, enqueue, queue_name
from bigmodel.core.errors import INTERNAL_ERROR, RESULT_NOT_STORABLE
from bigmodel.core.runner import ItemResult, RunLoop
from bigmodel.core.settings import Settings
from bigmodel.core.status import RequestStatus
from bigmodel.ledger.finalize import finalize_batch
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

    def __init__(self, *, settings: Settings, ledger: Ledger, storage: Storage, app: Celery,
                 loops: dict[str, RunLoop], worker_name: str) -> None:
        self.settings = settings
        self.ledger = ledger
        self.storage = storage
        self.app = app
        self.loops = loops
        self.worker_name = worker_name
        self.stats = Stats()

    def process(self, model: str, ids: Sequence[int]) -> None:
        """Claim, run and persist the requests `ids` of `model`; finish batches that are done.

        Raises only on infrastructure faults (database, storage) before results are persisted,
        in which case the caller must not acknowledge the messages.
        """
        claimed = self.ledger.claim(ids, worker=self.worker_name)
        if claimed:
            try:
                results = self.loops[model].run([c.item for c in claimed])
                self._persist(model, claimed, results)
            except Exception:
                # Hand the requests back so the redelivered messages can claim them again.
                try:
                    self.ledger.release([c.item.id for c in claimed])
                except Exception:
                    log.exception("could not release %d claimed requests", len(claimed))
                raise
        for batch_id in sorted({c.batch_id for c in claimed}):
            finalize_batch(self.ledger, self.storage, batch_id)

    def _persist(self, model: str, claimed: Sequence[Claimed],
                 results: Sequence[ItemResult]) -> None:
        by_id = {c.item.id: c for c in claimed}
        final: list[Finished] = []
        retry: list[int] = []
        delay_s = 0.0
        for res in results:
            c = by_id[res.id]
            if res.retry_after_s is not None and c.attempts <= self.settings.task_max_retries:
                retry.append(res.id)
                delay_s = max(delay_s, res.retry_after_s)
            elif res.ok:
                final.append(self._success(c, res))
            else:
                err = res.error or {"code": INTERNAL_ERROR, "message": "no result"}
                final.append(Finished(res.id, RequestStatus.FAILED, error_code=err["code"],
                                      error_message=err["message"]))
        self._finish(final)
        self.stats.items += len(results)
        self.stats.batches += 1
        self.stats.succeeded += sum(f.status == RequestStatus.SUCCEEDED for f in final)
        self.stats.failed += sum(f.status == RequestStatus.FAILED for f in final)
        if retry:
            # A transient fault (storage down, a URL timing out): back to queued and re-sent
            # after a pause; the attempt count bounds it.
            self.stats.retried += len(retry)
            log.warning("%d requests hit a transient fault; retrying in %.1fs", len(retry),
                        delay_s)
            time.sleep(min(delay_s, 30.0))
            self.ledger.release(retry)
            batch_of = {c.item.id: c.batch_id for c in claimed}
            groups: dict[str, list[int]] = {}
            for rid in retry:
                groups.setdefault(batch_of[rid], []).append(rid)
            enqueue(self.app, [(queue_name(model), chunk_message(b, model, rids))
                               for b, rids in groups.items()])

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
                self.ledger.finish([Finished(
                    f.id, RequestStatus.FAILED, error_code=RESULT_NOT_STORABLE,
                    error_message=f"the database refused the result: {str(exc.orig)[:500]}")])

    def _success(self, c: Claimed, res: ItemResult) -> Finished:
        body = json.dumps(res.output, ensure_ascii=False, separators=(",", ":")).encode()
        if len(body) <= self.settings.inline_output_max_bytes:
            return Finished(res.id, RequestStatus.SUCCEEDED, output=res.output)
        key = batch_key(self.ledger.tenant, c.batch_id, f"outputs/{res.id}.json")
        self.storage.put(key, body, content_type="application/json")
        return Finished(res.id, RequestStatus.SUCCEEDED, output_key=key)
