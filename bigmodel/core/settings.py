"""One typed, frozen settings object read from `BIGMODEL_*` environment variables.

With nothing set everything runs embedded under `BIGMODEL_HOME` (default `./.bigmodel`): an SQLite
file, a local storage folder and kombu's filesystem broker, so the demo needs no server.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIGMODEL_", frozen=True, extra="ignore")

    home: Path = Field(Path(".bigmodel"), description="Folder for the embedded defaults.")
    broker_url: str | None = Field(None, description="redis://host:6379/0; unset: embedded.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset: SQLite file.")
    storage_url: str | None = Field(None, description="s3://bucket/prefix or a local folder.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto).")
    tenant: str = "default"

    # Submission limits (the OpenAI Batch API allows 50,000 requests / 200 MB per file).
    max_requests_per_batch: int = Field(100_000, ge=1)
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_line_bytes: int = Field(8 * 1024 * 1024, ge=1)

    # Worker-side limits.
    inline_output_max_bytes: int = Field(64 * 1024, ge=0)
    fetch_timeout_s: float = Field(30.0, gt=0)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    visibility_timeout_s: int = Field(3600, ge=1)
    #: Claims of one request at most (transient retries and worker crashes both count).
    max_attempts: int = Field(5, ge=1)
    #: A worker holds its running requests this long and extends the lease while it works.
    lease_s: float = Field(120.0, gt=0)
    #: How often workers reconcile the ledger with the broker (0 turns it off).
    reconcile_interval_s: float = Field(30.0, ge=0)
    #: A queued request missing from the broker this long is re-enqueued.
    lost_grace_s: float = Field(60.0, ge=0)

    @field_validator("broker_url", "database_url", "storage_url", "s3_endpoint_url")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value and not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError(
                f"BIGMODEL_DATABASE_URL={value!r}: use postgresql://user@host/db or sqlite:///path"
            )
        return value

    @property
    def database(self) -> str:
        """The SQLAlchemy URL, with psycopg 3 as the PostgreSQL driver."""
        url = self.database_url or f"sqlite:///{(self.home / 'bigmodel.db').resolve()}"
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def storage(self) -> str:
        return self.storage_url or str((self.home / "storage").resolve())

    @property
    def embedded(self) -> bool:
        return not (self.broker_url or self.database_url or self.storage_url)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
