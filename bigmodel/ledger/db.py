"""Engines, sessions and schema migrations."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from bigmodel.core.errors import ConfigError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def make_engine(url: str) -> Engine:
    """An engine tuned for the ledger: WAL + busy timeout on SQLite, pre-ping on PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
            # WAL lets the producer read while a worker writes; the busy timeout makes concurrent
            # writers (several workers on one file) wait instead of failing.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):
    from alembic.config import Config

    if not (MIGRATIONS / "env.py").exists():
        raise ConfigError(f"migrations folder not found at {MIGRATIONS}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` on the engine's database."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def require_schema(engine: Engine) -> None:
    """Fail with a fix-it message when the database is not migrated to head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        tables = inspect(engine).get_table_names()
        state = "empty" if not tables else f"at revision {current}"
        raise ConfigError(
            f"database {engine.url.render_as_string(hide_password=True)} is {state}, "
            f"expected revision {head}: run `bigmodel db upgrade`"
        )
