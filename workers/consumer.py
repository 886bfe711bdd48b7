"""The batching consumer: pulls chunk messages from the model queues and forms GPU batches.

Celery has no dynamic batching, and running one Celery task per chunk would cap a batch at one
message. So the worker consumes its queues with kombu on the Celery app's own connection and
message protocol: it gathers messages until `max_batch_size` requests are pending or
`max_wait_s` has passed since the first one arrived, runs them as one batch, persists the
results, and only then acknowledges the messages (at-least-once; the ledger makes results
exactly-once). See docs/architecture.md for the reasoning.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from celery import Celery
from kombu import Consumer, Message, Queue

from bigmodel.broker import TASK_RUN_CHUNK, parse_message, queue_name
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Pending:
    messages: list[tuple[Message, str, list[int]]] = field(default_factory=list)
    items: int = 0
    first_at: float | None = None

    def add(self, message: Message, model: str, ids: list[int]) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.messages.append((message, model, ids))
        self.items += len(ids)


class BatchingConsumer:
    def __init__(self, app: Celery, runtime: Runtime, *, models: list[str], max_batch_size: int,
                 max_wait_s: float, stop: threading.Event | None = None) -> None:
        self.app = app
        self.runtime = runtime
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stop = stop or threading.Event()
        self.pending = Pending()

    def run(self) -> None:
        """Consume until `stop` is set; reconnect to the broker after a connection loss."""
        backoff = 1.0
        while not self.stop.is_set():
            try:
                self._run_connected()
                backoff = 1.0
            except self.app.connection_for_read().connection_errors as exc:
                log.warning("broker connection lost (%s); reconnecting in %.0fs", exc, backoff)
                self.pending = Pending()  # unacked messages come back through the broker
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _run_connected(self) -> None:
        queues = [Queue(queue_name(m), routing_key=queue_name(m)) for m in self.models]
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=3)
            log.info("consuming %s from %s", ", ".join(q.name for q in queues),
                     conn.as_uri())
            # Enough prefetched messages to fill one batch (chunks are at most a batch).
            consumer = Consumer(conn, queues=queues, callbacks=[self._on_message],
                                accept=["json"], on_decode_error=self._on_decode_error,
                                prefetch_count=max(2, self.max_batch_size))
            with consumer:
                while not self.stop.is_set():
                    self._drain(conn)
                    if self.pending.messages and self._ready():
                        self._flush()

    def _ready(self) -> bool:
        p = self.pending
        waited = time.monotonic() - (p.first_at or time.monotonic())
        return p.items >= self.max_batch_size or waited >= self.max_wait_s or self.stop.is_set()

    def _drain(self, conn) -> None:
        if self.pending.first_at is None:
            timeout = 1.0
        else:
            timeout = max(0.0, self.max_wait_s - (time.monotonic() - self.pending.first_at))
        try:
            conn.drain_events(timeout=max(timeout, 0.001))
        except TimeoutError:
            pass

    def _on_decode_error(self, message: Message, exc: Exception) -> None:
        """Pickle or other content we do not accept, or bytes that do not decode: drop it."""
        log.error("rejecting undecodable message (%s, %s): %s", message.content_type,
                  message.delivery_tag, exc)
        message.reject(requeue=False)

    def _on_message(self, body, message: Message) -> None:
        task = message.headers.get("task")
        try:
            if task != TASK_RUN_CHUNK:
                raise ValueError(f"unexpected task {task!r}")
            args = body[0] if isinstance(body, list | tuple) else body.get("args")
            batch_id, model, ids = parse_message(args[0])
            if model not in self.models:
                raise ValueError(f"model {model!r} is not loaded here")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            # Unreadable forever: drop it loudly rather than redeliver it forever.
            log.error("rejecting malformed message %s: %s", message.delivery_tag, exc)
            message.reject(requeue=False)
            return
        self.pending.add(message, model, ids)

    def _flush(self) -> None:
        pending, self.pending = self.pending, Pending()
        by_model: dict[str, list[int]] = {}
        for _, model, ids in pending.messages:
            by_model.setdefault(model, []).extend(ids)
        started = time.monotonic()
        try:
            for model, ids in by_model.items():
                self.runtime.process(model, ids)
        except Exception:
            # Results not persisted (database or storage down): hand the messages back.
            log.exception("processing %d requests failed; requeueing their messages",
                          pending.items)
            for message, _, _ in pending.messages:
                message.requeue()
            self.stop.wait(2.0)
            return
        for message, _, _ in pending.messages:
            message.ack()
        log.info("processed %d requests from %d messages in %.2fs", pending.items,
                 len(pending.messages), time.monotonic() - started)
