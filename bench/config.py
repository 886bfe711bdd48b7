"""Sizes of each section's workload: the default run and `--quick`."""

from __future__ import annotations

from dataclasses import dataclass, replace

SECTIONS = ("classify", "generate", "null", "submit", "batching", "latency", "memory")


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    image_ref: str = "s3"  # how images are referenced in both runs: s3:// objects or data: URIs
    # 1-3: in-process limit vs end to end
    classify_n: int = 512
    classify_batch: int = 32
    generate_n: int = 48
    generate_batch: int = 8
    new_tokens: int = 32
    # 4: orchestration ceiling (null model)
    null_n: int = 20_000
    null_batch: int = 256
    # 5: submit rate
    submit_n: int = 20_000
    # 6: formed batch size
    batching_n: int = 1_000
    batching_threads: int = 4
    batching_max_batch: int = 32
    batching_wait_ms: float = 50.0
    # 7: latency of a single high-priority request
    latency_samples: int = 20
    latency_bulk: int = 5_000
    latency_busy_budget_s: float = 60.0
    latency_without_priority: bool = False
    latency_batch_ms: int = 100  # the second run's model time per batch (null:delay_ms=...)
    latency_timed_batch: int = 32
    # 8: worker memory
    memory_first: int = 1_000
    memory_last: int = 50_000
    # time limits (seconds) for any one wait on the ledger
    timeout_s: float = 600.0


DEFAULT = Config()
QUICK = replace(
    DEFAULT,
    classify_n=64,
    generate_n=16,
    null_n=5_000,
    submit_n=5_000,
    batching_n=400,
    latency_samples=10,
    latency_bulk=2_000,
    latency_busy_budget_s=25.0,
    memory_last=10_000,
    timeout_s=300.0,
)
