"""The Celery app factory, queue naming and the message format producers and workers share.

The producer enqueues by task name; it never imports the worker's task code.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from bigmodel.core.batching import PRIORITIES
from bigmodel.core.settings import Settings

TASK_RUN_CHUNK = "bigmodel.run_chunk"
MESSAGE_VERSION = 1
QUEUE_PREFIX = "bigmodel.model."


def queue_name(model: str, priority: str = "normal") -> str:
    """One queue per registered model and priority, so a worker pulls only its models' work.

    Priorities are separate queues (`bigmodel.model.<name>`, `...:high`, `...:low`) rather than
    Redis's emulated message priorities; the worker lists them high first. ':' cannot occur in a
    model name, so queue names never collide.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    return QUEUE_PREFIX + model + ("" if priority == "normal" else f":{priority}")


@dataclass(frozen=True)
class ChunkMessage:
    batch_id: str
    model: str
    ids: list[int]
    priority: str = "normal"
    #: Run alone, never merged with other messages: requests whose worker died while running
    #: them, so that a poison request cannot take batch-mates down again.
    isolate: bool = False


def chunk_message(
    batch_id: str,
    model: str,
    ids: Sequence[int],
    *,
    priority: str = "normal",
    isolate: bool = False,
) -> dict[str, Any]:
    """A chunk of requests of one batch for one model.

    The message carries only request ids: the worker's claim (one UPDATE ... RETURNING) reads
    inputs and params from the ledger, which is the source of truth. Messages stay tiny whatever
    the inputs (data: URIs included), and a stale redelivery claims nothing.
    """
    msg = {
        "v": MESSAGE_VERSION,
        "batch_id": batch_id,
        "model": model,
        "ids": list(ids),
        "priority": priority,
    }
    if isolate:
        msg["isolate"] = True
    return msg


def parse_message(message: Any) -> ChunkMessage:
    """Validate a chunk message; ValueError for anything else."""
    if not isinstance(message, dict) or message.get("v") != MESSAGE_VERSION:
        raise ValueError(f"unsupported message {str(message)[:200]!r}")
    ids = message["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError("message ids must be a list of integers")
    priority = message.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}")
    return ChunkMessage(
        str(message["batch_id"]),
        str(message["model"]),
        ids,
        priority,
        bool(message.get("isolate", False)),
    )


def make_celery(settings: Settings, *, name: str = "bigmodel") -> Celery:
    app = Celery(name, broker=settings.broker, set_as_current=False)
    options: dict[str, Any] = {}
    if settings.broker.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "polling_interval": 0.2,
        }
    elif settings.broker.startswith(("redis://", "rediss://")):
        # Above the longest chunk's run time, or Redis redelivers a message still being worked.
        # 'priority' keeps queues in the order the worker lists them (high first) instead of
        # rotating them, so a high-priority message is always popped before bulk work.
        options = {
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
        }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue="bigmodel.default",
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.broker.startswith("filesystem://"),
    )
    return app


def take_turn(app: Celery, chore: str, seconds: float) -> bool:
    """Whether this process should do a fleet-wide chore now.

    At most one caller per `seconds` gets True across every process on the same Redis broker
    (`SET key NX PX`): the reconciler reads every queued request, so a fleet of workers takes
    turns rather than each doing it every interval. If the holder dies the key simply expires.
    A broker without such a primitive (the embedded filesystem one, one process) always says
    yes.
    """
    url = app.conf.broker_url or ""
    if not url.startswith(("redis://", "rediss://")):
        return True
    with app.pool.acquire(block=True) as conn:  # a pooled connection: this runs every interval
        client = conn.default_channel.client
        taken = client.set(
            f"bigmodel.turn.{chore}", socket.gethostname(), nx=True, px=max(1, int(seconds * 1000))
        )
    return bool(taken)


def enqueue(app: Celery, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Send `(queue, message)` pairs over one broker connection."""
    with app.producer_or_acquire() as producer:
        for queue, message in messages:
            # A short argsrepr: Celery would otherwise build a repr of every id list.
            app.send_task(
                TASK_RUN_CHUNK,
                args=[message],
                queue=queue,
                producer=producer,
                argsrepr=f"<{len(message['ids'])} requests of {message['batch_id']}>",
            )


def chunk_ids(
    pairs: Sequence[tuple[int, str]], sizes: dict[str, int]
) -> list[tuple[str, list[int]]]:
    """Group `(request_id, model)` pairs into per-model chunks of the model's batch size."""
    by_model: dict[str, list[int]] = {}
    for rid, model in pairs:
        by_model.setdefault(model, []).append(rid)
    chunks: list[tuple[str, list[int]]] = []
    for model, ids in by_model.items():
        size = max(1, sizes.get(model, 32))
        chunks.extend((model, ids[i : i + size]) for i in range(0, len(ids), size))
    return chunks
