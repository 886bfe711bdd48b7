"""The batching consumer: pulls chunk messages from the model queues and forms GPU batches.

Celery has no dynamic batching, and running one Celery task per chunk would cap a batch at one
message. So the worker consumes its queues with kombu on the Celery app's own connection and
message protocol, and `bigmodel.core.batching.collate` decides when pending messages form a
batch: `max_batch_size` requests, `max_wait_s` since the oldest arrived, or at once for high
priority. See docs/architecture.md for the reasoning.

Three things overlap: while the model thread runs batch N, this thread claims and decodes batch
N+1 (inputs fetched on the decode pool) and persists batch N-1's results. Batch N+1 is cut as
late as it can be while still ready when the model frees up, so requests arriving during batch N
join it (a model that is busy is what makes batches big). Messages are
acknowledged only after their results are in the ledger (at-least-once; the ledger makes
results exactly-once).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from celery import Celery
from kombu import Consumer, Message, Queue

from bigmodel.broker import TASK_RUN_CHUNK, parse_message, queue_name
from bigmodel.core.batching import PRIORITIES, Chunk, collate
from bigmodel.core.runner import ItemResult, Prepared
from bigmodel.ledger.repo import Claimed
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class PendingMessage:
    message: Message
    chunk: Chunk
    ids: list[int]


@dataclass
class Work:
    """One batch in flight: its messages, what was claimed, and the model's future."""

    model: str
    priority: str
    messages: list[Message]
    claimed: list[Claimed]
    prepared: Prepared | None
    future: Future[list[ItemResult]] | None = None
    started: float = field(default_factory=time.monotonic)
    isolate: bool = False
    computing_since: float | None = None  # set by the model thread when it starts this batch

    @property
    def items(self) -> int:
        return len(self.claimed)


class Ewma:
    """An exponentially weighted moving average per key (0.0 until the first sample)."""

    def __init__(self, weight: float = 0.3) -> None:
        self.weight = weight
        self.values: dict[str, float] = {}

    def add(self, key: str, sample: float) -> None:
        old = self.values.get(key)
        self.values[key] = sample if old is None else old + self.weight * (sample - old)

    def get(self, key: str) -> float:
        return self.values.get(key, 0.0)


class BatchingConsumer:
    def __init__(
        self,
        app: Celery,
        runtime: Runtime,
        *,
        models: list[str],
        max_batch_size: int,
        max_wait_s: float,
        stop: threading.Event | None = None,
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stop = stop or threading.Event()
        self.pending: list[PendingMessage] = []
        self.inflight: list[Work] = []
        # One thread runs every model: CUDA and most models are not safe to share across threads.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.connection_errors = app.connection_for_read().connection_errors
        settings = runtime.settings
        self.lease_every_s = settings.lease_s / 3
        self.reconcile_every_s = settings.reconcile_interval_s
        self._next_lease = time.monotonic() + self.lease_every_s
        # Not at once: a fleet restarting together should not all reconcile in the same second.
        self._next_reconcile = time.monotonic() + min(self.reconcile_every_s, 5.0)
        # Recent seconds per batch, per model: the model's compute and our claim + decode.
        self.compute_s = Ewma()
        self.prepare_s = Ewma()

    def run(self) -> None:
        """Consume until `stop` is set; reconnect to the broker after a connection loss."""
        backoff = 1.0
        try:
            while not self.stop.is_set():
                try:
                    self._run_connected()
                    backoff = 1.0
                except self.connection_errors as exc:
                    log.warning("broker connection lost (%s); reconnecting in %.0fs", exc, backoff)
                    self._drop_inflight()
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            self.model_thread.shutdown(wait=True)
            self.runtime.close()

    def _run_connected(self) -> None:
        queues = {
            p: [Queue(queue_name(m, p), routing_key=queue_name(m, p)) for m in self.models]
            for p in PRIORITIES
        }
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=3)
            names = ", ".join(q.name for p in PRIORITIES for q in queues[p])
            log.info("consuming %s from %s", names, conn.as_uri())
            # High-priority queues get a channel, hence a prefetch limit, of their own: the bulk
            # messages held for the next batches never keep a high-priority one waiting in
            # Redis. Normal before low: with the Redis transport's 'priority' queue order, BRPOP
            # lists the queues in this order. Enough bulk prefetch to fill the next batch while
            # one runs.
            urgent = conn.channel()
            try:
                consumers = [
                    self._consumer(urgent, queues["high"], prefetch=max(4, self.max_batch_size)),
                    self._consumer(
                        conn.default_channel,
                        queues["normal"] + queues["low"],
                        prefetch=max(4, 2 * self.max_batch_size),
                    ),
                ]
                with consumers[0], consumers[1]:
                    while not (self.stop.is_set() and not self.inflight):
                        self._step(conn)
                    # Stopping: messages pending but never claimed go back to their queues.
                    for p in self.pending:
                        p.message.requeue()
                    self.pending = []
            finally:
                urgent.close()

    def _consumer(self, channel, queues: list[Queue], *, prefetch: int) -> Consumer:
        return Consumer(
            channel,
            queues=queues,
            callbacks=[self._on_message],
            accept=["json"],
            on_decode_error=self._on_decode_error,
            prefetch_count=prefetch,
        )

    def _step(self, conn) -> None:
        self._reap()
        self.runtime.publish_due()
        self._housekeeping()
        wait_s = 1.0
        # A suspect request (its worker died running it) runs with nothing else in flight, so
        # that if it kills this worker too, no innocent request is charged an attempt.
        isolated = any(w.isolate for w in self.inflight)
        postponed = None
        if not self.stop.is_set() and len(self.inflight) >= 2 and not isolated:
            postponed = self._make_room_for_high_priority()
        if not self.stop.is_set() and len(self.inflight) < 2 and not isolated:
            now = time.monotonic()
            decision = collate(
                [p.chunk for p in self.pending],
                max_items=self.max_batch_size,
                max_wait_s=self.max_wait_s,
                now=now,
                busy_s=self._busy_s(now),
            )
            if decision.take and not (
                self.inflight and self.pending[decision.take[0]].chunk.isolate
            ):
                self._launch(decision.take)
                self._resume(postponed)
                return
            if decision.wait_s is not None:
                wait_s = decision.wait_s
        self._resume(postponed)
        if self.inflight:
            wait_s = min(wait_s, 0.005)
        try:
            conn.drain_events(timeout=max(wait_s, 0.001))
        except TimeoutError:
            pass

    def _make_room_for_high_priority(self) -> Work | None:
        """High-priority work is pending and two batches are in flight: take back the one that
        has not reached the model yet, so the high-priority batch runs next. Returns it (to be
        resubmitted behind the new batch by `_resume`), or None if there is nothing to do."""
        if not any(p.chunk.priority == "high" for p in self.pending):
            return None
        last = self.inflight[-1]
        if last.priority == "high" or last.future is None or not last.future.cancel():
            return None  # already high, or already running
        self.inflight.pop()
        return last

    def _resume(self, work: Work | None) -> None:
        if work is not None:
            work.future = self.model_thread.submit(self._compute, work)
            self.inflight.append(work)

    def _busy_s(self, now: float) -> float:
        """How much longer the model will likely be busy, less the time to prepare a batch.

        Zero when the model is idle or about to be: then a batch that is not full closes on
        `max_wait_s` as usual. While it is busy, pending requests gather into a bigger batch
        instead of being cut into a small one that would only wait for the model.
        """
        running = [w for w in self.inflight if w.future is not None and not w.future.done()]
        if not running:
            return 0.0
        work = running[-1]
        since = work.computing_since if work.computing_since is not None else now
        left = self.compute_s.get(work.model) - (now - since)
        return max(0.0, left - self.prepare_s.get(work.model))

    def _compute(self, work: Work) -> list[ItemResult]:
        """Runs on the model thread."""
        work.computing_since = time.monotonic()
        try:
            return self.runtime.compute(work.model, work.prepared)
        finally:
            self.compute_s.add(work.model, time.monotonic() - work.computing_since)

    def _housekeeping(self) -> None:
        """Extend the leases of in-flight requests; reconcile the ledger now and then."""
        now = time.monotonic()
        if now >= self._next_lease:
            self._next_lease = now + self.lease_every_s
            ids = [c.item.id for w in self.inflight for c in w.claimed]
            try:
                self.runtime.extend_leases(ids)
            except Exception:
                log.exception("could not extend the leases of %d requests", len(ids))
        if self.reconcile_every_s and now >= self._next_reconcile:
            self._next_reconcile = now + self.reconcile_every_s
            try:
                self.runtime.reconcile()
            except Exception:
                log.exception("reconcile failed; trying again in %.0fs", self.reconcile_every_s)

    def _launch(self, take: list[int]) -> None:
        chosen = [self.pending[i] for i in take]
        chosen_ids = {id(p) for p in chosen}
        self.pending = [p for p in self.pending if id(p) not in chosen_ids]
        model = chosen[0].chunk.model
        priority = min((p.chunk.priority for p in chosen), key=PRIORITIES.index)
        ids = [i for p in chosen for i in p.ids]
        messages = [p.message for p in chosen]
        began = time.monotonic()
        try:
            claimed, prepared = self.runtime.start(model, ids)
        except Exception:
            log.exception("claiming %d requests failed; requeueing their messages", len(ids))
            for m in messages:
                m.requeue()
            self.stop.wait(2.0)
            return
        self.prepare_s.add(model, time.monotonic() - began)
        work = Work(
            model,
            priority,
            messages,
            claimed,
            prepared,
            isolate=any(p.chunk.isolate for p in chosen),
        )
        if prepared is not None:
            work.future = self.model_thread.submit(self._compute, work)
        self.inflight.append(work)

    def _reap(self) -> None:
        """Persist and acknowledge finished batches, oldest first."""
        while self.inflight and (self.inflight[0].future is None or self.inflight[0].future.done()):
            work = self.inflight.pop(0)
            try:
                results = work.future.result() if work.future is not None else []
                self.runtime.finish(work.model, work.claimed, results, priority=work.priority)
            except Exception:
                # Results not persisted (database or storage down): hand the messages back.
                log.exception(
                    "persisting %d requests failed; requeueing their messages", work.items
                )
                for m in work.messages:
                    m.requeue()
                self.stop.wait(2.0)
                continue
            for m in work.messages:
                m.ack()
            log.info(
                "processed %d requests from %d messages in %.2fs (model %s)",
                work.items,
                len(work.messages),
                time.monotonic() - work.started,
                work.model,
            )

    def _drop_inflight(self) -> None:
        """After a broker loss the messages come back through the broker: release the claims."""
        for work in self.inflight:
            if work.future is not None:
                work.future.cancel()
                try:
                    results = work.future.result()
                    self.runtime.finish(work.model, work.claimed, results, priority=work.priority)
                    continue
                except Exception:
                    pass
            self.runtime.abort(work.claimed)
        self.inflight = []
        self.pending = []

    def _on_decode_error(self, message: Message, exc: Exception) -> None:
        """Pickle or other content we do not accept, or bytes that do not decode: drop it."""
        log.error(
            "rejecting undecodable message (%s, %s): %s",
            message.content_type,
            message.delivery_tag,
            exc,
        )
        message.reject(requeue=False)

    def _on_message(self, body, message: Message) -> None:
        task = message.headers.get("task")
        try:
            if task != TASK_RUN_CHUNK:
                raise ValueError(f"unexpected task {task!r}")
            args = body[0] if isinstance(body, list | tuple) else body.get("args")
            msg = parse_message(args[0])
            if msg.model not in self.models:
                raise ValueError(f"model {msg.model!r} is not loaded here")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # Unreadable forever: drop it loudly rather than redeliver it forever.
            log.error("rejecting malformed message %s: %s", message.delivery_tag, exc)
            message.reject(requeue=False)
            return
        self.pending.append(
            PendingMessage(
                message,
                Chunk(msg.model, len(msg.ids), msg.priority, time.monotonic(), msg.isolate),
                msg.ids,
            )
        )
