"""What the commands share: where PostgreSQL is, and how results are printed
(a table on a terminal, JSON with --json)."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from daemon.config import Settings


def resolve_dsn(settings: Settings, announce_to=None) -> str:
    """DATABASE_URL, or the embedded PostgreSQL (migrated, and its URL printed:
    on stderr by default, so that --json output on stdout stays clean)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from db import migrate
    from db.embedded import start_embedded_postgres

    dsn = start_embedded_postgres(settings.data_dir.resolve())
    migrate.upgrade(dsn)
    print(
        f"outboxd: embedded PostgreSQL is ready; write your chunks to DATABASE_URL={dsn}",
        file=announce_to or sys.stderr,
        flush=True,
    )
    return dsn


def connect(settings: Settings) -> psycopg.Connection:
    """A short-lived autocommit connection for an operator command."""
    return psycopg.connect(
        resolve_dsn(settings), autocommit=True, row_factory=dict_row, application_name="outboxd:cli"
    )


def print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console().print(table)
