"""Batching policy, as pure functions with an injected clock.

Two decisions are made here, both testable without sleeping or a broker:

- `collate`: which pending chunk messages form the next batch, and how long to wait for more.
  A batch closes when it holds `max_items` requests, when its oldest chunk has waited
  `max_wait_s` (Triton's max_batch_size / max_queue_delay), or at once when high-priority work
  is pending. While the model is still busy with the batch before (`busy_s`), a batch that is
  not full keeps gathering: its requests would wait for the model anyway, so they may as well
  wait in a bigger batch (as Triton's scheduler forms a batch only when an instance frees up).
  Within one model, chunks are taken by priority, then by arrival. An `isolate` chunk
  (requests whose worker died) always runs alone.
- `split_batches`: how the claimed items of one model are cut into forward passes: compatible
  items only, sorted by length, at most `max_batch_size` items and, if given, at most
  `max_batch_tokens` padded tokens (TGI's max-batch-total-tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PRIORITIES = ("high", "normal", "low")
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class Chunk:
    """A pending message as the policy sees it."""

    model: str
    items: int
    priority: str
    arrived_s: float
    isolate: bool = False


@dataclass(frozen=True)
class Decision:
    take: list[int]  # positions in `pending` forming the next batch (empty: wait)
    wait_s: float | None  # how long to wait for more when not taking (None: until a message)


def collate(
    pending: Sequence[Chunk], *, max_items: int, max_wait_s: float, now: float, busy_s: float = 0.0
) -> Decision:
    """The next batch to launch from `pending`, or how long to wait.

    `busy_s`: how much longer the model is expected to be busy before it could start a batch
    launched now (the running batch's expected remainder less the time to prepare the next).
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    if not pending:
        return Decision([], None)
    # Serve the model holding the most urgent chunk: best priority, then oldest.
    first = min(
        range(len(pending)),
        key=lambda i: (PRIORITY_RANK[pending[i].priority], pending[i].arrived_s),
    )
    model = pending[first].model
    mine = sorted(
        (i for i, c in enumerate(pending) if c.model == model),
        key=lambda i: (PRIORITY_RANK[pending[i].priority], pending[i].arrived_s),
    )
    if pending[first].isolate:
        return Decision([first], None)  # suspected poison: runs alone, at once
    mine = [i for i in mine if not pending[i].isolate]
    total = sum(pending[i].items for i in mine)
    oldest = min(pending[i].arrived_s for i in mine)
    urgent = pending[first].priority == "high"
    hold = max(max_wait_s - (now - oldest), busy_s)
    if total < max_items and hold > 0 and not urgent:
        return Decision([], hold)
    take: list[int] = []
    count = 0
    for i in mine:
        if take and count + pending[i].items > max_items:
            break
        take.append(i)
        count += pending[i].items
    return Decision(take, None)


def split_batches(
    keys: Sequence[tuple],
    *,
    max_batch_size: int,
    costs: Sequence[tuple[int, int]] | None = None,
    max_batch_tokens: int | None = None,
) -> list[list[int]]:
    """Group item positions by key (first element: compatibility, rest: sort order).

    `costs[i]` is `(rows, length)` for item i: a generation request with n return sequences
    is n rows of its prompt length plus max_new_tokens. A batch's padded cost is its total rows
    times its longest length; a new batch starts when adding an item would pass
    `max_batch_tokens` (an item too big on its own still gets a batch of its own).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    groups: dict[Any, list[int]] = {}
    for pos, key in enumerate(keys):
        groups.setdefault(key[0] if key else None, []).append(pos)
    batches: list[list[int]] = []
    for positions in groups.values():
        positions.sort(key=lambda p: keys[p][1:])
        current: list[int] = []
        rows = longest = 0
        for p in positions:
            r, length = costs[p] if costs else (1, 0)
            over_size = len(current) >= max_batch_size
            over_tokens = (
                max_batch_tokens is not None
                and current
                and (rows + r) * max(longest, length) > max_batch_tokens
            )
            if over_size or over_tokens:
                batches.append(current)
                current, rows, longest = [], 0, 0
            current.append(p)
            rows += r
            longest = max(longest, length)
        if current:
            batches.append(current)
    return batches
