"""Dead letters, for `outboxd dead-letters`: list them, send them back to
pending, or delete them. `selection` is the parameters of the named queries'
selection (ids, an error pattern, or all), as the command builds it."""
from __future__ import annotations

from typing import Any

import psycopg

from db.queries import query


def listing(conn: psycopg.Connection, selection: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every dead letter, or those the selection names."""
    rows = conn.execute(query("dead_letters")).fetchall()
    if selection is None:
        return rows
    keep = set(selected(conn, selection))
    return [r for r in rows if r["id"] in keep]


def selected(conn: psycopg.Connection, selection: dict[str, Any]) -> list[int]:
    """The ids of the dead letters the selection names."""
    return [r["id"] for r in conn.execute(query("select_dead_letters"), selection).fetchall()]


def retry(conn: psycopg.Connection, selection: dict[str, Any]) -> list[int]:
    """Back to pending, attempts reset; the ids that went."""
    return [r["id"] for r in conn.execute(query("retry_dead_letters"), selection).fetchall()]


def purge(conn: psycopg.Connection, event_ids: list[int]) -> list[int]:
    """Delete exactly these dead letters; the ids that went."""
    if not event_ids:
        return []
    return [r["id"] for r in conn.execute(query("purge_dead_letters"), {"event_ids": event_ids}).fetchall()]
