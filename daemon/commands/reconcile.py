"""`outboxd reconcile`: prove the collection matches PostgreSQL, or repair it."""
from __future__ import annotations

import asyncio
import sys
from uuid import UUID

from daemon.commands.common import live_collection, open_services, print_json, print_table, progress_bar
from daemon.errors import EXIT_FAILURE, EXIT_OK
from daemon.admin.drift import (
    KINDS,
    LOCAL_QDRANT_PAGE,
    SERVER_QDRANT_PAGE,
    Reconciler,
    ReconcileReport,
    Scope,
    enqueue_repair,
)


def register(sub, parents) -> None:
    p = sub.add_parser(
        "reconcile",
        parents=parents,
        help="compare every chunk with every point; report or repair drift",
        description="Stream chunks (PostgreSQL) and points (Qdrant) in id order and classify each "
        "difference: missing, orphaned, stale, wrong_model.",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when any drift exists (for cron and CI)")
    p.add_argument("--repair", action="store_true", help="enqueue an outbox event for each drifted chunk")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--source", type=UUID, metavar="ID", help="only chunks of this source")
    p.add_argument("--document", type=UUID, metavar="ID", help="only chunks of this document")
    p.add_argument("--page-size", type=int, default=2000, metavar="N", help="chunks per PostgreSQL page")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    report = asyncio.run(_reconcile(args, settings))
    if args.json:
        print_json(report.as_dict())
    else:
        _print(report, repaired=args.repair)
    return EXIT_FAILURE if args.check and report.drift else EXIT_OK


async def _reconcile(args, settings) -> ReconcileReport:
    async with open_services(settings) as (pool, client):
        collection, fingerprint = await live_collection(settings, pool, client)
        reconciler = Reconciler(
            pool,
            client,
            collection,
            fingerprint.id,
            scope=Scope(source_id=args.source, document_id=args.document),
            page_size=args.page_size,
            qdrant_page_size=SERVER_QDRANT_PAGE if settings.qdrant_url else LOCAL_QDRANT_PAGE,
        )
        tty = sys.stderr.isatty() and not args.json
        total = await reconciler.count_chunks() if tty else None
        with progress_bar(total, "reconciling", tty) as advance:
            return await reconciler.run(enqueue_repair(pool) if args.repair else None, advance)


def _print(report: ReconcileReport, *, repaired: bool) -> None:
    rows = [
        {"class": kind, "count": report.counts[kind], "examples": ", ".join(report.examples[kind])}
        for kind in KINDS
    ]
    print(
        f"{report.collection}: {report.chunks} chunks, {report.points} points, "
        f"{report.drift} drifted, {report.in_flight} in flight ({report.seconds:.1f}s)"
    )
    print_table(rows, ["class", "count", "examples"])
    if repaired:
        print(f"repair: {report.repaired} event(s) enqueued; `outboxd run` applies them")
