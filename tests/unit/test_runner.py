"""The run loop with an in-memory model (core logic only; real models are tested elsewhere)."""

import logging

import pytest

from bigmodel.core.batching import split_batches
from bigmodel.core.errors import PermanentError, RetryableError
from bigmodel.core.runner import Hooks, Item, RunLoop
from bigmodel.core.status import Task


class EchoModel:
    """Doubles numbers; 'bad-decode' fails in decode, 'poison' fails any batch it is in."""

    task = Task.CLASSIFY
    name = "echo"

    def __init__(self, *, drop_one=False):
        self.batches: list[list[int]] = []
        self.drop_one = drop_one

    def decode(self, item):
        v = item.input["v"]
        if v == "bad-decode":
            raise PermanentError("image_decode_failed", "cannot decode")
        if v == "flaky":
            raise RetryableError("storage down", delay_s=3.0)
        return v

    def batch_key(self, decoded, params):
        return (params.get("group", 0), decoded if isinstance(decoded, int) else 0)

    def predict(self, decoded, params):
        self.batches.append(list(decoded))
        if "poison" in decoded:
            raise ValueError("poisoned batch")
        out = [v * 2 for v in decoded]
        return out[:-1] if self.drop_one else out

    def encode(self, output, params):
        return {"value": output}


def items(*values, **params):
    return [Item(i, {"v": v}, dict(params)) for i, v in enumerate(values)]


def test_results_in_input_order_and_batches_sorted_within_size():
    model = EchoModel()
    res = RunLoop(model, max_batch_size=2).run(items(5, 1, 4, 2, 3))
    assert [r.output["value"] for r in res] == [10, 2, 8, 4, 6]
    assert model.batches == [[1, 2], [3, 4], [5]]


def test_bad_decode_fails_alone_and_poison_is_isolated():
    model = EchoModel()
    res = RunLoop(model, max_batch_size=8).run(items(1, "bad-decode", 2, "poison", 3))
    assert [r.ok for r in res] == [True, False, True, False, True]
    assert res[1].error == {"code": "image_decode_failed", "message": "cannot decode"}
    assert res[3].error["code"] == "model_error" and "poisoned batch" in res[3].error["message"]
    assert [r.output["value"] for r in res if r.ok] == [2, 4, 6]
    # One failed batch of four, then each item alone.
    assert len(model.batches) == 5


def test_transient_fault_marks_item_for_retry():
    res = RunLoop(EchoModel(), max_batch_size=4).run(items(1, "flaky"))
    assert res[0].ok and not res[1].ok
    assert res[1].retry_after_s == 3.0 and res[1].error["code"] == "transient_error"


def test_wrong_output_count_fails_each_item_with_a_clear_error():
    res = RunLoop(EchoModel(drop_one=True), max_batch_size=4).run(items(1, 2))
    # Re-run one by one: each alone returns zero outputs for one input.
    assert all(r.error["code"] == "internal_error" for r in res)
    assert "returned 0 outputs for 1 inputs" in res[0].error["message"]


def test_incompatible_items_never_share_a_batch():
    assert split_batches([(0, 3), (1, 1), (0, 1), (1, 2)], max_batch_size=8) == [[2, 0], [1, 3]]
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        split_batches([], max_batch_size=0)


def test_a_failing_hook_is_logged_not_fatal(caplog):
    class Boom(Hooks):
        def after_batch(self, model, size, seconds):
            raise RuntimeError("metrics down")

    with caplog.at_level(logging.ERROR):
        res = RunLoop(EchoModel(), max_batch_size=4, hooks=Boom()).run(items(1, 2))
    assert [r.output["value"] for r in res] == [2, 4]
    assert "hook" in caplog.text and "metrics down" in caplog.text


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


class OomModel(EchoModel):
    """Runs out of memory on any batch of more than two items, or on the value 'huge'."""

    def predict(self, decoded, params):
        if len(decoded) > 2 or "huge" in decoded:
            self.batches.append(["oom", len(decoded)])
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict(decoded, params)


def test_out_of_memory_halves_the_batch_before_failing_anything():
    model = OomModel()
    res = RunLoop(model, max_batch_size=8).run(items(1, 2, 3, 4, 5))
    assert [r.output["value"] for r in res] == [2, 4, 6, 8, 10]
    assert model.batches[0] == ["oom", 5]
    assert [len(b) for b in model.batches if b[0] != "oom"] == [2, 1, 2]


def test_out_of_memory_on_one_item_is_retried_later():
    res = RunLoop(OomModel(), max_batch_size=8).run(items(1, "huge"))
    assert res[0].ok
    assert res[1].retry_after_s == 5.0 and res[1].error["code"] == "transient_error"


def test_null_model_stands_in_for_a_model_with_its_delay_per_batch():
    import time
    from types import SimpleNamespace

    from bigmodel.core.errors import ConfigError
    from bigmodel.core.settings import Settings
    from bigmodel.models.null import NullRunner, null_delay_ms

    assert null_delay_ms("null:") == 0 and null_delay_ms("null:delay_ms=40") == 40
    for bad in ("null:delay_ms=", "null:delay_ms=-1", "null:40", "null:delay_ms=4.5"):
        with pytest.raises(ConfigError, match="null:delay_ms=N"):
            null_delay_ms(bad)
    info = SimpleNamespace(name="slow", task=Task.GENERATE, source="null:delay_ms=40")
    runner = NullRunner.load(info, device="cpu", settings=Settings())
    started = time.perf_counter()
    results = RunLoop(runner, max_batch_size=8).run(items(1, 2, 3))
    assert time.perf_counter() - started >= 0.04  # one batch, one delay
    assert [r.output["sequences"][0]["finish_reason"] for r in results] == ["length"] * 3
