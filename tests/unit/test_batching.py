"""Batch formation with an injected clock: size, wait, priority and token budget."""

import pytest

from bigmodel.core.batching import Chunk, collate, split_batches


def chunk(items, at, priority="normal", model="m"):
    return Chunk(model=model, items=items, priority=priority, arrived_s=at)


def test_nothing_pending_waits_for_a_message():
    d = collate([], max_items=8, max_wait_s=0.05, now=10.0)
    assert d.take == [] and d.wait_s is None


def test_waits_for_more_until_the_window_closes():
    pending = [chunk(1, 10.0), chunk(2, 10.01)]
    d = collate(pending, max_items=8, max_wait_s=0.05, now=10.02)
    assert d.take == [] and d.wait_s == pytest.approx(0.03)
    assert collate(pending, max_items=8, max_wait_s=0.05, now=10.05).take == [0, 1]


def test_closes_as_soon_as_the_batch_is_full_and_leaves_the_rest():
    pending = [chunk(3, 10.0), chunk(3, 10.001), chunk(3, 10.002), chunk(3, 10.003)]
    d = collate(pending, max_items=8, max_wait_s=1.0, now=10.004)
    assert d.take == [0, 1]  # 6 items; a third chunk would pass 8
    assert collate(pending[2:], max_items=8, max_wait_s=1.0, now=10.004).take == []


def test_keeps_gathering_past_the_window_while_the_model_is_busy():
    pending = [chunk(1, 10.0), chunk(2, 10.01)]
    # The window closed, but the model needs 0.3 s more before it could start this batch.
    d = collate(pending, max_items=8, max_wait_s=0.05, now=10.1, busy_s=0.3)
    assert d.take == [] and d.wait_s == pytest.approx(0.3)
    # Once it is about to be free (busy_s 0) the batch goes, with whatever arrived meanwhile.
    grown = [*pending, chunk(3, 10.2)]
    assert collate(grown, max_items=8, max_wait_s=0.05, now=10.4, busy_s=0.0).take == [0, 1, 2]
    # A full batch, or high priority, does not wait for the model to be nearly free.
    full = [chunk(4, 10.0), chunk(4, 10.01)]
    assert collate(full, max_items=8, max_wait_s=0.05, now=10.02, busy_s=5.0).take == [0, 1]
    urgent = [chunk(1, 10.0, "high")]
    assert collate(urgent, max_items=8, max_wait_s=0.05, now=10.0, busy_s=5.0).take == [0]
    # Within the window, whichever is longer is waited for.
    d = collate(pending, max_items=8, max_wait_s=0.05, now=10.02, busy_s=0.01)
    assert d.take == [] and d.wait_s == pytest.approx(0.03)


def test_a_chunk_bigger_than_the_batch_still_goes_alone():
    assert collate([chunk(50, 0.0), chunk(1, 0.1)], max_items=8, max_wait_s=1, now=0.2).take == [0]


def test_high_priority_goes_first_and_does_not_wait():
    pending = [chunk(4, 10.0, "low"), chunk(4, 10.1, "low"), chunk(1, 10.2, "high")]
    d = collate(pending, max_items=8, max_wait_s=5.0, now=10.2)
    assert d.take == [2, 0]  # the high chunk first, then the oldest low one that fits
    normal_first = [chunk(2, 1.0, "low"), chunk(2, 2.0, "normal")]
    assert collate(normal_first, max_items=2, max_wait_s=0, now=3.0).take == [1]


def test_one_model_per_batch_the_most_urgent_first():
    pending = [chunk(2, 1.0, model="a"), chunk(2, 0.5, model="b"), chunk(2, 1.1, model="a")]
    assert collate(pending, max_items=8, max_wait_s=0.1, now=2.0).take == [1]
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        collate(pending, max_items=0, max_wait_s=0, now=0)


def test_split_by_size_sorted_by_length():
    keys = [(0, 5), (0, 1), (0, 3), (0, 2), (0, 4)]
    assert split_batches(keys, max_batch_size=2) == [[1, 3], [2, 4], [0]]


def test_split_by_token_budget_counts_padded_rows():
    keys = [(0, 10), (0, 10), (0, 100), (0, 12)]
    costs = [(1, 10), (1, 10), (1, 100), (2, 12)]
    # Sorted: 10, 10, 12 (2 rows), 100. Budget 40: 10+10 -> 2*10=20; adding the 2-row 12
    # makes 4*12=48 > 40, so it starts a new batch; 100 alone passes the budget but must run.
    assert split_batches(keys, max_batch_size=8, costs=costs, max_batch_tokens=40) == [
        [0, 1],
        [3],
        [2],
    ]
    assert split_batches(keys, max_batch_size=8, costs=costs, max_batch_tokens=10_000) == [
        [0, 1, 3, 2]
    ]


def test_isolated_chunks_run_alone_and_first():
    pending = [chunk(2, 1.0), Chunk("m", 1, "normal", 1.5, isolate=True), chunk(2, 1.2)]
    assert collate(pending, max_items=8, max_wait_s=0.1, now=2.0).take == [0, 2]
    pending = [
        Chunk("m", 1, "normal", 0.5, isolate=True),
        chunk(2, 1.0),
        Chunk("m", 1, "normal", 0.6, isolate=True),
    ]
    assert collate(pending, max_items=8, max_wait_s=0.1, now=2.0).take == [0]


def test_an_isolated_chunk_neither_fills_nor_ages_the_batch_it_never_joins():
    pending = [chunk(2, 1.0), Chunk("m", 10, "normal", 1.5, isolate=True)]
    d = collate(pending, max_items=8, max_wait_s=1.0, now=1.6)
    assert d.take == [] and d.wait_s == pytest.approx(0.4)
