"""`outboxd reconcile`: prove the collection matches PostgreSQL, or repair it.

It is also the safety net for writes the capture triggers never saw (made
with them disabled, or under session_replication_role = replica in 'origin'
mode): whatever the outbox missed shows up here as drift, and --repair
enqueues it.
"""
from __future__ import annotations

import sys
from typing import Any
from uuid import UUID

import click

from daemon.commands.options import json_option, settings_options, verdict
from daemon.errors import EXIT_CHECK_FAILED

# qdrant-client's local mode keeps every point in memory; Qdrant recommends a
# server above this many points
LOCAL_MODE_POINTS = 20_000
SAFETY_NET = "writes made with the capture triggers disabled are caught here"


@click.command(help="Stream chunks (PostgreSQL) and points (Qdrant) in id order and classify each difference: "
               "missing, orphaned, stale, wrong_model, missing_sparse, wrong_sparse. The safety net for writes made with the capture "
               "triggers off: --repair enqueues an event per drifted chunk. --check exits 3 on drift.")
@click.option("--check", is_flag=True, help="exit 3 when any drift exists, else 0 (for cron and CI)")
@click.option("--repair", is_flag=True, help="enqueue an outbox event for each drifted chunk")
@click.option("--deep", is_flag=True, help="read whole payloads, so a text or metadata edited by hand in Qdrant "
              "shows too (slower; by default they are judged by content_hash and metadata_hash)")
@click.option("--recreate-missing", is_flag=True,
              help="with --repair: where this Qdrant lacks the live collection (a new server, a lost volume), "
              "create it empty here, so that every chunk is enqueued and rebuilt from PostgreSQL")
@json_option
@click.option("--source", type=click.UUID, metavar="ID", help="only chunks of this source")
@click.option("--document", type=click.UUID, metavar="ID", help="only chunks of this document")
@click.option("--page-size", type=click.IntRange(min=1), default=2000, show_default=True, metavar="N",
              help="chunks per PostgreSQL page")
@settings_options(qdrant=True)
def command(settings, check: bool, repair: bool, deep: bool, recreate_missing: bool, as_json: bool,
            source: UUID | None, document: UUID | None, page_size: int) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from daemon.commands.common import print_json

    if recreate_missing and not repair:
        raise click.UsageError("--recreate-missing rebuilds the collection: it goes with --repair")
    report, extra = asyncio.run(_reconcile(settings, repair, deep, as_json, source, document, page_size,
                                           recreate_missing))
    code = verdict(EXIT_CHECK_FAILED if check and report.drift else 0)  # even if the reader goes away mid-print
    for warning in extra["warnings"]:
        print(f"outboxd reconcile: warning: {warning}", file=sys.stderr)
    if as_json:
        print_json({**report.as_dict(), **extra})
    else:
        _print(report, extra, repaired=repair)
    return code


async def _reconcile(settings, repair: bool, deep: bool, quiet: bool, source, document, page_size: int,
                     recreate_missing: bool = False):
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.admin.reconcile import LOCAL_QDRANT_PAGE, SERVER_QDRANT_PAGE, Reconciler, Scope, enqueue_repair
    from daemon.commands.common import live_collection, open_services, progress_bar
    from daemon.core.collection_shape import CollectionShape
    from daemon.core.qdrant_store import QdrantStore
    from db.capture import read_capture_mode

    async with open_services(settings) as (pool, client):
        live = await live_collection(settings, pool, client, recreate_missing=recreate_missing)
        collection = live.name
        store = QdrantStore(client, settings.collection, collection, shape=CollectionShape.of(settings))
        reconciler = Reconciler(
            pool,
            client,
            collection,
            await store.projection(live.fingerprint.id),
            scope=Scope(source_id=source, document_id=document),
            page_size=page_size,
            qdrant_page_size=SERVER_QDRANT_PAGE if settings.qdrant.url else LOCAL_QDRANT_PAGE,
            deep=deep,
        )
        tty = sys.stderr.isatty() and not quiet
        total = await reconciler.count_chunks() if tty else None
        with progress_bar(total, "reconciling", tty) as advance:
            report = await reconciler.run(enqueue_repair(pool) if repair else None, advance)
        mode = await read_capture_mode(pool)
        extra: dict[str, Any] = {"capture_mode": mode, "safety_net": f"{SAFETY_NET}; capture mode: {mode or 'unknown'}",
                                 "warnings": []}
        if not settings.qdrant.url:
            points = (await client.count(collection, exact=True)).count
            extra["local_mode_points"] = points
            if points > LOCAL_MODE_POINTS:
                extra["warnings"].append(
                    f"Qdrant local mode holds every point in memory ({points} points in {collection!r}); Qdrant "
                    f"recommends a server above {LOCAL_MODE_POINTS:,} points: set QDRANT_URL"
                )
    return report, extra


def _print(report, extra: dict[str, Any], *, repaired: bool) -> None:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.admin.reconcile import KINDS
    from daemon.commands.common import print_table

    rows = [
        {"class": kind, "count": report.counts[kind], "examples": ", ".join(report.examples[kind])}
        for kind in KINDS
    ]
    print(
        f"{report.collection}: {report.chunks} chunks, {report.points} points, "
        f"{report.drift} drifted, {report.in_flight} in flight ({report.seconds:.1f}s)"
    )
    print_table(rows, ["class", "count", "examples"])
    print(extra["safety_net"])
    if repaired:
        print(f"repair: {report.repaired} event(s) enqueued; `outboxd run` applies them")
