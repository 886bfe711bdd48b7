"""A model that does no work, for measuring the pipeline's own ceiling (`null:` sources).

Register it like any model (`bigmodel models register noop null: --task generate`); it returns
well-formed outputs of the task's shape at once, so a benchmark sees only queueing, claiming,
persisting and acknowledging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bigmodel.core.runner import Item
from bigmodel.core.settings import Settings
from bigmodel.core.status import Task

NULL_PREFIX = "null:"


class NullRunner:
    def __init__(self, name: str, task: Task) -> None:
        self.name = name
        self.task = task

    @classmethod
    def load(cls, info, *, device: str, settings: Settings) -> NullRunner:
        return cls(info.name, info.task)

    def decode(self, item: Item) -> Any:
        return None

    def batch_key(self, decoded: Any, params: dict[str, Any]) -> tuple:
        return (0,)

    def predict(self, decoded: Sequence[Any], params: Sequence[dict[str, Any]]) -> list[Any]:
        return [None] * len(decoded)

    def encode(self, output: Any, params: dict[str, Any]) -> dict[str, Any]:
        if self.task is Task.CLASSIFY:
            return {"labels": [{"index": 0, "label": "null", "score": 1.0}]}
        return {"sequences": [{"text": "", "tokens": 0, "finish_reason": "length"}]}
