"""`outboxd backfill`: enqueue chunks that existed before outboxd did.

For adopting outboxd on a database that already holds data: every chunk in
scope gets an outbox event (unless one is already pending), page by page in
id order, with a checkpoint in outboxd.scan_progress so an interrupted run
resumes where it stopped. The daemon then applies them; chunks whose point is
already right cost a payload comparison, not an embedding.
"""
from __future__ import annotations

import asyncio
import sys
from uuid import UUID

from daemon.commands.common import open_services, print_json, progress_bar
from daemon.errors import EXIT_OK
from db.queries import query


def register(sub, parents) -> None:
    p = sub.add_parser("backfill", parents=parents, help="enqueue existing chunks (resumable)")
    p.add_argument("--source", type=UUID, metavar="ID", help="only chunks of this source")
    p.add_argument("--document", type=UUID, metavar="ID", help="only chunks of this document")
    p.add_argument("--page-size", type=int, default=5000, metavar="N", help="chunks enqueued per statement")
    p.add_argument("--restart", action="store_true", help="forget the checkpoint and start from the first chunk")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=execute)


def job_name(source: UUID | None, document: UUID | None) -> str:
    if document:
        return f"backfill:document:{document}"
    if source:
        return f"backfill:source:{source}"
    return "backfill:all"


def execute(args, settings) -> int:
    result = asyncio.run(backfill(settings, args.source, args.document, args.page_size, args.restart, args.json))
    if args.json:
        print_json(result)
    else:
        state = "resumed" if result["resumed"] else "started"
        if result["already_complete"]:
            print(f"{result['job']} was already complete; --restart runs it again")
        else:
            print(
                f"{result['job']} {state}: scanned {result['scanned']} chunks, enqueued {result['enqueued']} "
                f"(the rest already had a pending event); `outboxd run` applies them"
            )
    return EXIT_OK


async def backfill(settings, source, document, page_size: int, restart: bool, quiet: bool = True) -> dict:
    job = job_name(source, document)
    result = {"job": job, "scanned": 0, "enqueued": 0, "resumed": False, "already_complete": False}
    async with open_services(settings, qdrant=False) as (pool, _):
        async with pool.connection() as conn:
            if restart:
                await conn.execute(query("scan_progress_reset"), {"job": job})
            progress = await (await conn.execute(query("scan_progress"), {"job": job})).fetchone()
            if progress and progress["completed_at"]:
                result["already_complete"] = True
                return result
            after = progress["last_chunk_id"] if progress else None
            result["resumed"] = after is not None
            scope = {"source_id": source, "document_id": document}
            total = (await (await conn.execute(query("count_chunks"), scope)).fetchone())["n"]
            tty = sys.stderr.isatty() and not quiet
            with progress_bar(total, job, tty) as advance:
                if progress:
                    advance(progress["done"])
                while True:
                    row = await (
                        await conn.execute(
                            query("backfill_page"), {"job": job, "after": after, "limit": page_size, **scope}
                        )
                    ).fetchone()
                    result["scanned"] += row["scanned"]
                    result["enqueued"] += row["enqueued"]
                    advance(row["scanned"])
                    if row["scanned"] < page_size:
                        break
                    after = row["last_id"]
            await conn.execute(query("scan_progress_complete"), {"job": job})
    return result
