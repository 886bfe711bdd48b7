"""The model contract and the loop that runs it: decode → batch → predict → encode.

A model runner (LitServe's shape) only knows how to turn one input into a model-ready item, a list
of items into outputs, and one output into JSON. This loop owns everything around it: per-item
failure isolation, batch splitting, output-count checks and hooks. It imports no torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from bigmodel.core.batching import split_batches
from bigmodel.core.errors import (
    INTERNAL_ERROR,
    MODEL_ERROR,
    TRANSIENT_ERROR,
    PermanentError,
    RetryableError,
)
from bigmodel.core.status import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One request as the runner sees it."""

    id: int
    input: dict[str, Any]
    params: dict[str, Any]


@dataclass(frozen=True)
class ItemResult:
    id: int
    output: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    #: Set when a transient fault (storage outage, CUDA OOM) hit this item: try it again later.
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.retry_after_s is None


@dataclass
class Prepared:
    """Items decoded and cut into batches, ready for the model."""

    items: list[Item]
    decoded: list[Any]
    failed: dict[int, ItemResult]
    batches: list[list[int]]


class ModelRunner(Protocol):
    """What one task's model file implements (see bigmodel/models/classify.py, generate.py)."""

    task: Task
    name: str

    def decode(self, item: Item) -> Any:
        """Fetch and decode one input; raise `PermanentError` for a bad one. Runs on a thread."""

    def predict(self, decoded: Sequence[Any], params: Sequence[dict[str, Any]]) -> list[Any]:
        """Run one batch; return one output per input, in order."""

    def encode(self, output: Any, params: dict[str, Any]) -> dict[str, Any]:
        """Turn one output into its JSON result."""

    def batch_key(self, decoded: Any, params: dict[str, Any]) -> tuple:
        """Items with equal first elements may share a batch; the rest orders them within it."""

    # Optional: `cost(decoded, params) -> (rows, length)` for a token budget (see split_batches).


class Hooks:
    """No-op hooks; subclass for metrics, timing or logging. A failing hook is logged only."""

    def before_batch(self, model: str, size: int) -> None: ...

    def after_batch(self, model: str, size: int, seconds: float) -> None: ...

    def after_item(self, model: str, result: ItemResult) -> None: ...


def _call_hook(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("hook %s failed; ignored", getattr(fn, "__qualname__", fn))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or its MPS/CPU cousins), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)[:200].lower()


def _error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, PermanentError):
        return exc.as_dict()
    if isinstance(exc, RetryableError):
        return {"code": TRANSIENT_ERROR, "message": str(exc)[:2000]}
    return {"code": MODEL_ERROR, "message": f"{type(exc).__name__}: {exc}"[:2000]}


class RunLoop:
    """Runs items through one model runner, isolating failures per item.

    Decoding (fetching images, tokenizing) runs on a thread pool so I/O overlaps compute. Nothing
    raises out of `run`: a permanent error fails only the item it came from (a failed batch is
    re-run item by item to find the culprit), a transient one marks its items for a later retry.
    """

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_size: int,
        max_batch_tokens: int | None = None,
        decode_threads: int = 8,
        hooks: Hooks | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.hooks = hooks or Hooks()
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, item: Item) -> tuple[Any, ItemResult | None]:
        try:
            return self.runner.decode(item), None
        except RetryableError as exc:
            return None, ItemResult(item.id, error=_error(exc), retry_after_s=exc.delay_s)
        except Exception as exc:
            return None, ItemResult(item.id, error=_error(exc))

    def prepare(self, items: Sequence[Item]) -> Prepared:
        """Decode every item (on the thread pool) and cut the good ones into batches."""
        decoded = list(self._pool.map(self._decode, items))
        failed: dict[int, ItemResult] = {}
        ready: list[int] = []
        for pos, (_value, bad) in enumerate(decoded):
            if bad is not None:
                failed[pos] = bad
            else:
                ready.append(pos)
        keys = [self.runner.batch_key(decoded[p][0], items[p].params) for p in ready]
        cost = getattr(self.runner, "cost", None)
        costs = None
        if cost is not None and self.max_batch_tokens is not None:
            costs = [cost(decoded[p][0], items[p].params) for p in ready]
        cuts = split_batches(
            keys,
            max_batch_size=self.max_batch_size,
            costs=costs,
            max_batch_tokens=self.max_batch_tokens,
        )
        return Prepared(
            list(items), [v for v, _ in decoded], failed, [[ready[b] for b in cut] for cut in cuts]
        )

    def execute(self, prepared: Prepared) -> list[ItemResult]:
        """Run the prepared batches through the model; one result per item, in input order."""
        results = dict(prepared.failed)
        for positions in prepared.batches:
            batch = self._run_batch(positions, prepared.items, prepared.decoded)
            for pos, res in zip(positions, batch, strict=True):
                results[pos] = res
        out = [results[pos] for pos in range(len(prepared.items))]
        for res in out:
            _call_hook(self.hooks.after_item, self.runner.name, res)
        return out

    def run(self, items: Sequence[Item]) -> list[ItemResult]:
        """Return one result per item, in input order."""
        return self.execute(self.prepare(items))

    def _run_batch(self, positions, items, decoded) -> list[ItemResult]:
        inputs = [decoded[p] for p in positions]
        params = [items[p].params for p in positions]
        _call_hook(self.hooks.before_batch, self.runner.name, len(inputs))
        started = time.monotonic()
        try:
            outputs = self.runner.predict(inputs, params)
            if len(outputs) != len(inputs):
                raise PermanentError(
                    INTERNAL_ERROR,
                    f"model {self.runner.name!r} returned {len(outputs)} outputs "
                    f"for {len(inputs)} inputs",
                )
        except RetryableError as exc:
            log.warning("batch of %d hit a transient fault: %s", len(positions), exc)
            return [
                ItemResult(items[p].id, error=_error(exc), retry_after_s=exc.delay_s)
                for p in positions
            ]
        except Exception as exc:
            if is_out_of_memory(exc):
                if len(positions) > 1:
                    # Halve the batch and try again before failing anything.
                    half = len(positions) // 2
                    log.warning("out of memory on a batch of %d; trying halves", len(positions))
                    return self._run_batch(positions[:half], items, decoded) + self._run_batch(
                        positions[half:], items, decoded
                    )
                err = RetryableError(f"out of memory on a single item: {exc}", delay_s=5.0)
                return [
                    ItemResult(items[positions[0]].id, error=_error(err), retry_after_s=err.delay_s)
                ]
            if len(positions) > 1:
                # One bad item must not fail its batch-mates: run each alone to find it.
                log.warning(
                    "batch of %d failed (%s); retrying items one by one", len(positions), exc
                )
                return [r for p in positions for r in self._run_batch([p], items, decoded)]
            log.exception("item %s failed in predict", items[positions[0]].id)
            return [ItemResult(items[positions[0]].id, error=_error(exc))]
        finally:
            _call_hook(
                self.hooks.after_batch, self.runner.name, len(inputs), time.monotonic() - started
            )
        results = []
        for p, out, prm in zip(positions, outputs, params, strict=True):
            try:
                results.append(ItemResult(items[p].id, output=self.runner.encode(out, prm)))
            except Exception as exc:
                results.append(ItemResult(items[p].id, error=_error(exc)))
        return results
