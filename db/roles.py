"""The least-privilege group roles: db/sql/roles.sql with its two role names
filled in by psycopg.sql (quoted identifiers and literals, never string
concatenation), and applying it in one transaction (idempotent), on a one-off
connection of its own."""
from __future__ import annotations

from pathlib import Path

from psycopg import sql

from db.gateway import connect_async

ROLES_FILE = Path(__file__).resolve().parent / "sql" / "roles.sql"


def render(writer: str, worker: str) -> sql.Composed:
    """The roles SQL for these two names."""
    if writer == worker:
        raise ValueError("the writer and the worker role must differ")
    return sql.SQL(ROLES_FILE.read_text(encoding="utf-8")).format(
        writer=sql.Identifier(writer),
        worker=sql.Identifier(worker),
        writer_name=sql.Literal(writer),
        worker_name=sql.Literal(worker),
    )


async def apply_roles(dsn: str, writer: str, worker: str) -> None:
    """Create the roles if missing and (re)grant, in one transaction."""
    statement = render(writer, worker)
    async with await connect_async(dsn, application_name="outboxd:cli", timeout=30) as conn, conn.transaction():
        await conn.execute(statement)
