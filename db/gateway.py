"""The one gateway to PostgreSQL: how outboxd connects, and how it runs the
named queries of sql/ (db.queries loads them). Only db/ runs them: the
repositories (db.outbox, db.catalog, db.coordination, db.scans) name what
each query does for the rest of outboxd.

- A process that runs (`run`, `relay`) and an operator command (`status`,
  `reconcile`, ...) use a pool (make_pool): autocommit, so each statement is
  its own short transaction, and nothing holds a transaction open across
  embedding or Qdrant.
- A one-off connection (connect, connect_async: the LISTEN wake-up, a sync
  command, the migrations) always has an application_name, so it shows in
  pg_stat_activity, and a connect timeout (the DSN's own, where it sets one),
  so an unreachable server fails it instead of hanging a thread.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from db.queries import query

# jsonb (metadata) is parsed for every chunk the daemon and reconcile read.
set_json_loads(orjson.loads)

CHECK_AFTER_IDLE_S = 2.0
_returned: weakref.WeakKeyDictionary[AsyncConnection, float] = weakref.WeakKeyDictionary()


async def _note_return(conn: AsyncConnection) -> None:
    _returned[conn] = time.monotonic()


async def _check_if_idle(conn: AsyncConnection) -> None:
    """Probe a connection before handing it out only where it sat idle for a while
    (a server restart or failover drops idle ones): a busy daemon then pays no
    extra round trip per query, and a connection that broke under use fails its
    query as an outage, which is retried."""
    if time.monotonic() - _returned.get(conn, 0.0) > CHECK_AFTER_IDLE_S:
        await AsyncConnectionPool.check_connection(conn)


def make_pool(
    dsn: str, *, application_name: str, min_size: int, max_size: int, timeout: float = 30.0
) -> AsyncConnectionPool:
    """A closed pool: the caller opens it (and closes it) explicitly.

    Connections are autocommit, so each statement is its own short transaction:
    nothing the daemon does holds a transaction open across embedding or Qdrant.
    application_name makes each worker visible in pg_stat_activity. timeout:
    seconds a caller waits for a connection before PoolTimeout (an outage,
    retried and counted as one).
    """
    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"application_name": application_name, "autocommit": True, "row_factory": dict_row},
        open=False,
        timeout=timeout,
        name=application_name,
        check=_check_if_idle,
        reset=_note_return,
    )


def _timeout(dsn: str, seconds: float) -> dict[str, Any]:
    """connect_timeout for psycopg, unless the DSN sets its own (libpq takes whole seconds, at least 2)."""
    return {} if "connect_timeout" in conninfo_to_dict(dsn) else {"connect_timeout": max(2, round(seconds))}


def connect(dsn: str, *, application_name: str, timeout: float, autocommit: bool = True,
            row_factory: Any = dict_row) -> psycopg.Connection:
    """A one-off synchronous connection (an operator command, the migrations)."""
    return psycopg.connect(dsn, autocommit=autocommit, row_factory=row_factory,
                           application_name=application_name[:63], **_timeout(dsn, timeout))


async def connect_async(dsn: str, *, application_name: str, timeout: float) -> AsyncConnection:
    """A one-off asynchronous autocommit connection (the LISTEN wake-up, a diagnosis)."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name=application_name[:63],
                                                 **_timeout(dsn, timeout))


async def probe(dsn: str, *, application_name: str, timeout: float) -> None:
    """Connect once, outside any pool, and hang up: the server's or the network's
    own error where it fails (a pool only times out), so that a refusal (no such
    database, bad credentials) is told from an outage at once."""
    conn = await connect_async(dsn, application_name=application_name, timeout=timeout)
    await conn.close()


# Queries planned anew at every run. Their optional filters ("%(x)s IS NULL OR ...")
# leave a generic plan blind to which filters are set, and psycopg prepares a
# statement once it has run five times, after which PostgreSQL may keep such a
# plan: the keyword side of a search took 783 ms instead of 11 at 100,000 chunks
# (a nested loop over every document), and search answered in seconds.
UNPREPARED = frozenset({"search_keyword", "search_hits"})


async def _rows(conn: AsyncConnection, name: str, params: dict[str, Any]) -> list[dict]:
    cur = await conn.execute(query(name), params, prepare=False if name in UNPREPARED else None)
    return await cur.fetchall() if cur.description else []


async def fetch(pool: AsyncConnectionPool, name: str, /, *, timeout: float | None = None, **params) -> list[dict]:
    """Run a named query on a connection from the pool (its own short autocommit
    transaction) and return its rows, if it returns any. timeout: seconds to wait
    for a connection (the pool's own by default)."""
    async with pool.connection(timeout=timeout) as conn:
        return await _rows(conn, name, params)


class Transaction:
    """Named queries on one connection, inside one transaction (db.gateway.transaction)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def fetch(self, name: str, /, **params) -> list[dict]:
        return await _rows(self._conn, name, params)


@asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[Transaction]:
    """Several named queries in one short transaction: committed when the block
    ends, rolled back if it raises. Only a repository method opens one, around
    its own statements: never across embedding or a Qdrant call."""
    async with pool.connection() as conn, conn.transaction():
        yield Transaction(conn)


async def ping(pool: AsyncConnectionPool, *, timeout: float) -> None:
    """One round trip on a pooled connection (readiness, and the pool's first
    connection at start-up); a connection not had within timeout is PoolTimeout."""
    await fetch(pool, "ping", timeout=timeout)
