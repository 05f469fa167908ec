"""What the commands share: where PostgreSQL is, and how results are printed
(a table on a terminal, JSON with --json)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

from daemon.config import Settings
from daemon.errors import ConfigError, ServiceUnavailableError, describe, refusal
from db.embedded import start_embedded_postgres
from db.gateway import connect_async, make_pool
from db.gateway import probe as probe_postgres

if TYPE_CHECKING:
    from daemon.core.catalog import CollectionView


def resolve_dsn(settings: Settings, announce_to=None) -> str:
    """DATABASE_URL, or the embedded PostgreSQL (migrated). The daemons (`run`,
    `relay`) print its URL to announce_to: where an application writes. The
    other commands use it without a word (db.embedded logs it at DEBUG)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    if settings.qdrant.url:
        # An embedded PostgreSQL holds no chunks: against a real server every point would
        # look orphaned, and the verifier's repairs would delete them.
        raise ConfigError(
            f"QDRANT_URL names a Qdrant server ({settings.qdrant.url}) but DATABASE_URL is not set, so outboxd "
            "would start an empty embedded PostgreSQL and take every point of that server for drift. Set "
            "DATABASE_URL to the database those points come from, or unset QDRANT_URL for the embedded defaults."
        )
    from db import migrate  # Alembic: only where outboxd starts its embedded PostgreSQL

    dsn = start_embedded_postgres(settings.data_dir.resolve())
    migrate.upgrade(dsn)
    if announce_to is not None:
        print(f"outboxd: embedded PostgreSQL is ready; write your chunks to DATABASE_URL={dsn}",
              file=announce_to, flush=True)
    return dsn


def print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


PIPED_WIDTH = 100  # columns of a table printed to a pipe or a file, unless COLUMNS says otherwise
WHOLE_WORD = 40  # a cell that is one word up to this long (an id, a number) is never folded


def output_width(stream=None) -> int | None:
    """The width to print at: COLUMNS where set, the terminal's own (None), else
    PIPED_WIDTH (a pipe, a file: a CI log, a README; --json is the machine format)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if (stream or sys.stdout).isatty() else PIPED_WIDTH


@functools.cache
def _console_class():
    from rich.console import Console

    class PipedConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise  # the BrokenPipeError rich caught: daemon.cli ends quietly, where rich would exit 1

    return PipedConsole


def console(*, stderr: bool = False, **options: Any):
    """A rich Console on stdout (or stderr) at output_width(), for which a reader
    that went away is a BrokenPipeError like any other write's."""
    return _console_class()(stderr=stderr, width=output_width(sys.stderr if stderr else sys.stdout), **options)


def print_line(text: str) -> None:
    """One line of prose on stdout, wrapped at output_width() as the tables are."""
    console().print(text, markup=False, highlight=False, overflow="fold")


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    from rich.table import Column, Table

    cells = [["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]

    def column(i: int, name: str) -> Column:
        # Ids stay whole, for grep; longer values wrap, and a word wider than its
        # column (a path) is folded onto the next line, never cut.
        whole = all(len(row[i]) <= WHOLE_WORD and " " not in row[i] for row in cells)
        return Column(name, overflow="fold", no_wrap=whole)

    table = Table(*(column(i, name) for i, name in enumerate(columns)), title=title)
    for row in cells:
        table.add_row(*row)
    console().print(table)


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, qdrant: bool = True):
    """A small pool and (optionally) a Qdrant client for an operator command."""
    # qdrant-client loads only for the commands that open Qdrant (not migrate, roles, backfill)
    from daemon.core.qdrant_connect import make_client, probe

    dsn = resolve_dsn(settings)
    await _refused_at_once(dsn)
    pool = make_pool(dsn, application_name="outboxd:cli", min_size=1, max_size=2)
    pool_log = logging.getLogger("psycopg.pool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)  # a one-shot command says it once, below, not per connection attempt
    try:
        await pool.open(wait=True, timeout=settings.startup_timeout)
    except psycopg.OperationalError as exc:  # psycopg_pool.PoolTimeout: no connection within the timeout
        await pool.close(timeout=1.0)
        raise ServiceUnavailableError(
            f"PostgreSQL stayed unreachable for {settings.startup_timeout:g}s: {await _why_not(dsn, exc)}; "
            f"check DATABASE_URL, or raise OUTBOXD_STARTUP_TIMEOUT{stale_embedded_hint(dsn)}"
        ) from exc
    finally:
        pool_log.setLevel(level)
    try:
        client = make_client(settings) if qdrant else None
        if client is not None:
            await probe(client, settings)  # another web server, a refused key: 78 now
    except BaseException:
        await pool.close()
        raise
    try:
        yield pool, client
    finally:
        if client is not None:
            await client.close()
        await pool.close()


async def _refused_at_once(dsn: str) -> None:
    """One direct connection first: a refusal (no such database, bad credentials,
    an invalid option) is a configuration error now, where the pool would retry
    it until the start-up timeout. An outage is left to the pool's wait."""
    try:
        await probe_postgres(dsn, application_name="outboxd:cli", timeout=10.0)
    except psycopg.Error as exc:
        if (refused := refusal(exc)) is not None:
            raise refused from None


def stale_embedded_hint(dsn: str) -> str:
    """Where DATABASE_URL names the socket folder of an embedded PostgreSQL that
    has stopped (it runs only while an outboxd process holds it), say so."""
    with contextlib.suppress(Exception):
        host = conninfo_to_dict(dsn).get("host") or ""
        if host.startswith("/") and (Path(host) / "PG_VERSION").exists():
            return (f"; {host} is the data folder of an embedded PostgreSQL, which runs only while an outboxd "
                    "process holds it: start `outboxd run` again, or `unset DATABASE_URL` to let this command "
                    "start it itself")
    return ""


async def _why_not(dsn: str, timeout: Exception) -> str:
    """Why the pool could not connect: the server's or the network's own words
    (PoolTimeout only says that it timed out)."""
    try:
        conn = await connect_async(dsn, application_name="outboxd:cli", timeout=2)
    except psycopg.Error as exc:
        return describe(exc)
    await conn.close()
    return describe(timeout)


async def live_collection(settings: Settings, pool, client, *, recreate_missing: bool = False) -> "CollectionView":
    """The live collection behind OUTBOXD_COLLECTION (daemon.core.catalog), which
    must exist in this Qdrant (the one the catalog says holds it) and record the
    model that made its vectors. recreate_missing: where this Qdrant lacks it (a
    new server, a lost volume), create it empty here and record that it lives here."""
    # qdrant-client loads only for the commands that open Qdrant (not migrate, roles, backfill)
    from daemon.core.catalog import Catalog, Home
    from daemon.core.qdrant_connect import describe_target, location
    from daemon.core.qdrant_store import QdrantStore
    from daemon.embedding.fingerprint import check_fingerprint

    catalog = Catalog(pool)
    live = await catalog.resolve(settings.collection, client)
    if recreate_missing and live.record is not None and not live.exists:
        store = QdrantStore(client, settings.collection, collection=live.name)
        uid = await store.ensure_collection(live.record.fingerprint, live, recreate_missing=True)
        await catalog.record_home(live.name, Home(uid, location(settings)), replace=True)
        live = await catalog.resolve(settings.collection, client)
    live.check_home(describe_target(settings))
    if not live.exists:
        raise ConfigError(
            f"there is no Qdrant collection for {settings.collection!r} yet: start the daemon "
            "(`outboxd run`) once, or check OUTBOXD_COLLECTION and QDRANT_URL"
        )
    if live.fingerprint is None:
        check_fingerprint(None, live.record.fingerprint if live.record else None, settings.collection, live.name)
    return live


def progress_bar(total: int | None, description: str, enabled: bool):
    """A rich progress bar on a terminal (stderr); a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext(lambda n: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextlib.contextmanager
    def bar():
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console(stderr=True),
            transient=True,
        ) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)

    return bar()
