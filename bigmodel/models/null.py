"""A model that does no work, for measuring the pipeline's own ceiling (`null:` sources).

Register it like any model (`bigmodel models register noop null: --task generate`); it returns
well-formed outputs of the task's shape at once, so a benchmark sees only queueing, claiming,
persisting and acknowledging. `null:delay_ms=N` sleeps N ms per batch instead, to stand in for a
model's time (priority latency, fault tests that need work in flight for a while).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from bigmodel.core.errors import ConfigError
from bigmodel.core.runner import Item
from bigmodel.core.settings import Settings
from bigmodel.core.status import Task

NULL_PREFIX = "null:"
_DELAY = re.compile(r"delay_ms=(\d{1,6})")


def null_delay_ms(source: str) -> int:
    """The per-batch delay of a `null:` source: `null:` is 0, `null:delay_ms=N` is N."""
    rest = source[len(NULL_PREFIX) :]
    if not rest:
        return 0
    match = _DELAY.fullmatch(rest)
    if match is None:
        raise ConfigError(
            f"source {source!r}: use `null:` or `null:delay_ms=N` "
            "(N whole milliseconds per batch, at most 999999)"
        )
    return int(match.group(1))


class NullRunner:
    def __init__(self, name: str, task: Task, delay_ms: int = 0) -> None:
        self.name = name
        self.task = task
        self.delay_s = delay_ms / 1000.0

    @classmethod
    def load(cls, info, *, device: str, settings: Settings) -> NullRunner:
        return cls(info.name, info.task, null_delay_ms(info.source))

    def decode(self, item: Item) -> Any:
        return None

    def batch_key(self, decoded: Any, params: dict[str, Any]) -> tuple:
        return (0,)

    def predict(self, decoded: Sequence[Any], params: Sequence[dict[str, Any]]) -> list[Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return [None] * len(decoded)

    def encode(self, output: Any, params: dict[str, Any]) -> dict[str, Any]:
        if self.task is Task.CLASSIFY:
            return {"labels": [{"index": 0, "label": "null", "score": 1.0}]}
        return {"sequences": [{"text": "", "tokens": 0, "finish_reason": "length"}]}
