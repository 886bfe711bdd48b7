"""The request schema: parsing and validating a submission, line by line.

Every input format goes through `parse_submission`, which returns validated `RequestSpec`s or
raises `SubmissionRejected` naming every bad line. A second format (the OpenAI Batch file) plugs in
as another entry of `FORMATS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bigmodel.core.errors import LineError, SubmissionRejected
from bigmodel.core.status import Task

MAX_CUSTOM_ID_CHARS = 512
MAX_PROMPT_CHARS = 1_000_000
IMAGE_SCHEMES = ("s3://", "https://", "http://", "data:")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RequestLine(_Strict):
    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    model: str = Field(min_length=1, max_length=200)
    input: dict[str, Any]
    params: dict[str, Any] = Field(default_factory=dict)


class ClassifyInput(_Strict):
    image: str = Field(min_length=6)

    @field_validator("image")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(IMAGE_SCHEMES):
            raise ValueError(
                "must be an s3://bucket/key, https:// URL or data:image/...;base64, URI"
            )
        if value.startswith("data:") and ";base64," not in value[:100]:
            raise ValueError("a data: URI must be base64 encoded (data:image/png;base64,...)")
        return value


class ClassifyParams(_Strict):
    top_k: int = Field(5, ge=1, le=1000)


class GenerateInput(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class GenerateParams(_Strict):
    max_new_tokens: int = Field(32, ge=1, le=8192)
    num_return_sequences: int = Field(1, ge=1, le=16)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_float(cls, value: Any) -> Any:
        # JSON writers send 1 for 1.0; strict mode would reject it.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        for s in value:
            if not 1 <= len(s) <= 256:
                raise ValueError("each stop string must be 1 to 256 characters")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> GenerateParams:
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError("num_return_sequences > 1 needs do_sample=true (greedy repeats)")
        if self.do_sample and self.temperature == 0.0:
            raise ValueError("temperature must be > 0 when do_sample is true")
        return self


SCHEMAS: dict[Task, tuple[type[_Strict], type[_Strict]]] = {
    Task.CLASSIFY: (ClassifyInput, ClassifyParams),
    Task.GENERATE: (GenerateInput, GenerateParams),
}


@dataclass(frozen=True)
class ModelRef:
    """What parsing needs to know of a registered model."""

    name: str
    task: Task
    version: int = 1


@dataclass(frozen=True)
class RequestSpec:
    """One validated request, ready for the ledger."""

    line: int
    custom_id: str
    model: str
    task: Task
    input: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)


def _pydantic_errors(line: int, exc: ValidationError, custom_id: str | None, prefix: str):
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or None)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        yield LineError(line, msg, custom_id=custom_id, field=where)


def _validate(line: int, raw: Any, models: Mapping[str, ModelRef]):
    if not isinstance(raw, dict):
        yield LineError(line, f"expected a JSON object, got {type(raw).__name__}")
        return
    custom_id = raw.get("custom_id") if isinstance(raw.get("custom_id"), str) else None
    try:
        req = RequestLine.model_validate(raw)
    except ValidationError as exc:
        yield from _pydantic_errors(line, exc, custom_id, "")
        return
    ref = models.get(req.model)
    if ref is None:
        known = ", ".join(sorted(models)) or "none registered"
        yield LineError(
            line,
            f"unknown model {req.model!r} (known: {known})",
            custom_id=custom_id,
            field="model",
        )
        return
    input_schema, params_schema = SCHEMAS[ref.task]
    bad = False
    try:
        inp = input_schema.model_validate(req.input)
    except ValidationError as exc:
        bad = True
        for e in _pydantic_errors(line, exc, custom_id, "input"):
            e.reason += f" (model {ref.name!r} is a {ref.task} model)"
            yield e
    try:
        params = params_schema.model_validate(req.params)
    except ValidationError as exc:
        bad = True
        yield from _pydantic_errors(line, exc, custom_id, "params")
    if bad:
        return
    yield RequestSpec(
        line=line,
        custom_id=req.custom_id,
        model=ref.name,
        task=ref.task,
        input=inp.model_dump(),
        params=params.model_dump(exclude_defaults=False),
    )


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_jsonl(
    lines: Iterable[bytes | str],
    models: Mapping[str, ModelRef],
    *,
    max_requests: int = 100_000,
    max_line_bytes: int = 8 * 1024 * 1024,
) -> list[RequestSpec]:
    """Parse bigmodel's JSONL format: `{"custom_id", "model", "input", "params"}` per line.

    Blank lines are skipped; a UTF-8 BOM and CRLF endings are accepted. Every bad line is
    reported (up to the error list's end), and any bad line rejects the whole submission.
    """
    specs: list[RequestSpec] = []
    errors: list[LineError] = []
    first_seen: dict[str, int] = {}
    n = 0
    for n, raw_line in enumerate(lines, start=1):
        if isinstance(raw_line, bytes):
            if len(raw_line) > max_line_bytes:
                errors.append(
                    LineError(
                        n,
                        f"line is {len(raw_line)} bytes, over the limit of "
                        f"{max_line_bytes} (put large inputs in storage)",
                    )
                )
                continue
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(LineError(n, f"not valid UTF-8 at byte {exc.start}"))
                continue
        else:
            text = raw_line
            if len(text) > max_line_bytes:
                errors.append(LineError(n, f"line is over the limit of {max_line_bytes} bytes"))
                continue
        if n == 1:
            text = text.lstrip("\ufeff")
        text = text.strip()
        if not text:
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(LineError(n, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if "\\u0000" in text and _has_nul(raw):
            errors.append(
                LineError(
                    n,
                    "contains a NUL character (\\u0000), which the ledger cannot store; remove it",
                )
            )
            continue
        for item in _validate(n, raw, models):
            if isinstance(item, LineError):
                errors.append(item)
                continue
            if item.custom_id in first_seen:
                errors.append(
                    LineError(
                        n,
                        f"duplicate custom_id, first used on line {first_seen[item.custom_id]}",
                        custom_id=item.custom_id,
                        field="custom_id",
                    )
                )
                continue
            first_seen[item.custom_id] = n
            specs.append(item)
        if len(specs) > max_requests:
            errors.append(
                LineError(n, f"more than {max_requests} requests in one batch; split the file")
            )
            break
    if not specs and not errors:
        errors.append(LineError(max(n, 1), "the submission holds no requests"))
    if errors:
        raise SubmissionRejected(errors, total_lines=n)
    return specs


def parse_records(
    records: Iterable[Mapping[str, Any]], models: Mapping[str, ModelRef], **limits: int
) -> list[RequestSpec]:
    """Parse an iterable of dicts (the Python API) exactly as JSONL lines are parsed."""
    return parse_jsonl((json.dumps(r, ensure_ascii=False) for r in records), models, **limits)


Format = Literal["bigmodel"]
FORMATS: dict[str, Callable[..., list[RequestSpec]]] = {"bigmodel": parse_jsonl}


def parse_submission(
    lines: Iterable[bytes | str],
    models: Mapping[str, ModelRef],
    *,
    format: str = "bigmodel",
    **limits: int,
) -> list[RequestSpec]:
    try:
        parser = FORMATS[format]
    except KeyError:
        raise ValueError(f"unknown input format {format!r}; known: {', '.join(FORMATS)}") from None
    return parser(lines, models, **limits)
