"""What the broker holds: the request ids in queued and unacknowledged chunk messages.

The reconciler compares this with the ledger's queued requests to find those whose messages
were lost (a Redis restart without persistence, a flush, an eviction).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from celery import Celery

from bigmodel.broker import PRIORITIES, parse_message, queue_name

_SCAN_PAGE = 1000


def _ids_of_envelope(raw: bytes | str) -> list[int]:
    """Request ids in one kombu message envelope (JSON with a base64 or plain body)."""
    try:
        env = json.loads(raw)
        if isinstance(env, list):  # the unacked hash stores [envelope, exchange, routing_key]
            env = env[0]
        body: Any = env["body"]
        if env.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return parse_message(args[0]).ids
    except (ValueError, KeyError, IndexError, TypeError):
        return []


def ids_in_broker(
    app: Celery, models: Iterable[str], *, stale_unacked_s: float | None = None
) -> set[int] | None:
    """Ids in the models' queues and in flight; None when the transport cannot be inspected.

    A message delivered to a worker more than `stale_unacked_s` ago and still unacknowledged is
    not counted: its worker most likely died holding it (it would otherwise only come back after
    the visibility timeout). Re-sending a copy is harmless; only one claim can succeed.
    """
    queues = [queue_name(m, p) for m in models for p in PRIORITIES]
    url = app.conf.broker_url or ""
    ids: set[int] = set()
    if url.startswith(("redis://", "rediss://")):
        with app.connection_for_read() as conn:
            client = conn.default_channel.client
            for q in queues:
                length = client.llen(q)
                for start in range(0, length, _SCAN_PAGE):
                    for raw in client.lrange(q, start, start + _SCAN_PAGE - 1):
                        ids.update(_ids_of_envelope(raw))
            if stale_unacked_s is None:
                tags = [t for t, _ in client.hscan_iter("unacked", count=_SCAN_PAGE)]
            else:
                tags = client.zrangebyscore("unacked_index", time.time() - stale_unacked_s, "+inf")
            for start in range(0, len(tags), _SCAN_PAGE):
                for raw in client.hmget("unacked", tags[start : start + _SCAN_PAGE]):
                    if raw is not None:
                        ids.update(_ids_of_envelope(raw))
        return ids
    if url.startswith("filesystem://"):
        folder = Path(app.conf.broker_transport_options["data_folder_in"])
        for f in folder.glob("*.msg"):
            try:
                ids.update(_ids_of_envelope(f.read_bytes()))
            except OSError:  # consumed while we looked
                continue
        return ids
    return None
