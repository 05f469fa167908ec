"""Schema migrations with Alembic, run programmatically on a psycopg DSN."""
from __future__ import annotations

import functools
from pathlib import Path

import psycopg
import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.gateway import connect, fetch

VERSION_TABLE = "outboxd_alembic_version"
# Two `outboxd migrate` at once (a Job retried, several hosts at deploy) would
# race on CREATE: the second waits for this lock, then finds the schema at head.
MIGRATE_LOCK = 0x6F7574626F7864  # "outboxd"
MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATE_CONNECT_TIMEOUT = 30.0  # seconds


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _engine(dsn: str) -> sqlalchemy.Engine:
    # psycopg parses the DSN (URLs, key=value, unix sockets) exactly as the daemon does; Alembic
    # runs its own transactions, so the connection is not autocommit
    return sqlalchemy.create_engine(
        "postgresql+psycopg://", poolclass=sqlalchemy.NullPool,
        creator=lambda: connect(dsn, application_name="outboxd:migrate", timeout=MIGRATE_CONNECT_TIMEOUT,
                                autocommit=False, row_factory=None),
    )


def _run(dsn: str, fn, *args) -> None:
    engine = _engine(dsn)
    try:
        with engine.begin() as conn:
            # session-level: held across Alembic's per-migration transactions, released with the connection
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATE_LOCK})")
            cfg = _config()
            cfg.attributes["connection"] = conn
            fn(cfg, *args)
    finally:
        engine.dispose()


def upgrade(dsn: str, revision: str = "head") -> None:
    """Idempotent: at head it does nothing."""
    _run(dsn, command.upgrade, revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    _run(dsn, command.downgrade, revision)


@functools.cache  # the scripts do not change while a process runs; readiness asks every few seconds
def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


async def schema_revision(pool) -> str | None:
    """The database's schema revision, through a running process's pool: what its
    readiness asks every few seconds, without an engine or a connection of its own."""
    try:
        rows = await fetch(pool, "schema_revision")
    except psycopg.errors.UndefinedTable:
        return None
    return rows[0]["version_num"] if rows else None


def current_revision(dsn: str) -> str | None:
    engine = _engine(dsn)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()
    finally:
        engine.dispose()
