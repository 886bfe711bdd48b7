"""One error hierarchy with stable codes that users can filter on."""

from __future__ import annotations

# Stable per-item error codes (what a failed request carries in its `error.code`).
IMAGE_DECODE_FAILED = "image_decode_failed"
IMAGE_TOO_LARGE = "image_too_large"
OBJECT_TOO_LARGE = "object_too_large"
TRANSIENT_ERROR = "transient_error"
OBJECT_NOT_FOUND = "object_not_found"
FETCH_FAILED = "fetch_failed"
PROMPT_TOO_LONG = "prompt_too_long"
INVALID_PARAMS = "invalid_params"
INVALID_INPUT = "invalid_input"
MODEL_ERROR = "model_error"
BATCH_CANCELLED = "batch_cancelled"
BATCH_EXPIRED = "batch_expired"
POISON = "poison"
INTERNAL_ERROR = "internal_error"
RESULT_NOT_STORABLE = "result_not_storable"


class BigModelError(Exception):
    """Base of every error bigmodel raises on purpose."""


class ConfigError(BigModelError):
    """A setting or registry entry is wrong; the message says how to fix it."""


class RetryableError(BigModelError):
    """A transient fault (broker, database, storage, CUDA OOM): try again after `delay_s`."""

    def __init__(self, message: str, *, delay_s: float = 1.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class PermanentError(BigModelError):
    """A fault that will not go away by retrying; `code` is stable and user-visible."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class LineError(BigModelError):
    """One bad line of a submission: where (line, custom_id, field) and why."""

    def __init__(
        self, line: int, reason: str, *, custom_id: str | None = None, field: str | None = None
    ) -> None:
        self.line = line
        self.reason = reason
        self.custom_id = custom_id
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.custom_id is not None:
            where += f" (custom_id {self.custom_id!r})"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.reason}"

    def as_dict(self) -> dict[str, object]:
        return {
            "line": self.line,
            "custom_id": self.custom_id,
            "field": self.field,
            "reason": self.reason,
        }


class SubmissionRejected(BigModelError):
    """A submission had bad lines; nothing was written or enqueued."""

    def __init__(self, errors: list[LineError], *, total_lines: int) -> None:
        self.errors = errors
        self.total_lines = total_lines
        shown = "\n".join(f"  {e}" for e in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        bad_lines = len({e.line for e in errors})
        super().__init__(
            f"submission rejected: {bad_lines} of {total_lines} lines are invalid; "
            f"nothing was enqueued\n{shown}{more}"
        )


class NotFound(BigModelError):
    """A batch or model that does not exist."""
