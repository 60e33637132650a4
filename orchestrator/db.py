"""Connections to the job store, with one-line errors, and schema migration."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.settings import redact
from worker.errors import ServiceUnavailableError, UsageError


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (the only driver we install)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if not url.startswith("postgresql"):
        raise UsageError(f"unsupported database URL {redact(url)}: use postgresql://... or sqlite:///...")
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                         connect_args={"connect_timeout": 5})


def sessions(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def check(url: str) -> None:
    """Raise ServiceUnavailableError naming the URL if the database cannot be reached."""
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else "connection failed"
        raise ServiceUnavailableError(f"database {redact(url)} is unreachable: {reason}") from e


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["url"] = normalise_url(url)
    return cfg


def upgrade(url: str, revision: str = "head") -> str:
    """Apply migrations up to ``revision``; returns the revision now current."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    check(url)
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as e:
        raise ServiceUnavailableError(f"migrating {redact(url)} failed: {e}") from e
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() or "base"


#: The Alembic revision the models in orchestrator.schema match (a test keeps it the head).
SCHEMA_REVISION = "0007"


def ensure_schema(url: str) -> None:
    """Upgrade an embedded SQLite store on first use; insist on a migrated Postgres.

    The common case (already at SCHEMA_REVISION) is one small query and no Alembic import:
    loading Alembic and its revision scripts would double `difflabel status`'s time."""
    try:
        with get_engine(url).connect() as conn:
            current = conn.execute(text("select version_num from alembic_version")).scalar()
    except SQLAlchemyError:
        check(url)  # unreachable: a one-line error naming the URL
        current = None  # reachable, no alembic_version table: a new database
    if current == SCHEMA_REVISION:
        return
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current == head:
        return
    if normalise_url(url).startswith("sqlite"):
        upgrade(url)
        return
    raise UsageError(f"database {redact(url)} is at revision {current or 'empty'}, not {head}: "
                     "run `difflabel db upgrade`")
