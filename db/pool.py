"""The connection pool every daemon query goes through."""
from __future__ import annotations

import time
import weakref

import orjson
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

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
