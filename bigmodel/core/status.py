"""Batch and request statuses, named as in the OpenAI Batch API where they overlap."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in BATCH_FINAL


class RequestStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in REQUEST_FINAL


BATCH_FINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED}
)
REQUEST_FINAL = frozenset(
    {RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED, RequestStatus.EXPIRED}
)
#: Statuses a request can still leave: what "unfinished" means everywhere.
REQUEST_OPEN = (RequestStatus.QUEUED, RequestStatus.RUNNING)
COUNT_KEYS = ("total", "queued", "running", "succeeded", "failed", "cancelled", "expired")


class Task(StrEnum):
    CLASSIFY = "classify"
    GENERATE = "generate"
