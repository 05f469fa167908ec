"""`outboxd backfill`: enqueue chunks that existed before outboxd did.

For adopting outboxd on a database that already holds data: every chunk in
scope gets an outbox event (unless one is already pending), page by page in
id order, with a checkpoint in outboxd.scan_progress so an interrupted run
resumes where it stopped. The daemon then applies them; chunks whose point is
already right cost a payload comparison, not an embedding.
"""
from __future__ import annotations

from uuid import UUID

import click

from daemon.commands.options import json_option, settings_options


@click.command(help="Enqueue an outbox event for every chunk in scope that has none pending (resumable: a "
               "checkpoint in outboxd.scan_progress moves with each page). For chunks written before "
               "`outboxd migrate` installed the capture triggers.")
@click.option("--source", type=click.UUID, metavar="ID", help="only chunks of this source")
@click.option("--document", type=click.UUID, metavar="ID", help="only chunks of this document")
@click.option("--page-size", type=click.IntRange(min=1), default=5000, show_default=True, metavar="N",
              help="chunks enqueued per statement")
@click.option("--restart", is_flag=True, help="forget the checkpoint and start from the first chunk")
@json_option
@settings_options()
def command(settings, source: UUID | None, document: UUID | None, page_size: int, restart: bool, as_json: bool) -> int:
    import asyncio

    from daemon.commands.common import print_json

    result = asyncio.run(backfill(settings, source, document, page_size, restart, as_json))
    if as_json:
        print_json(result)
    elif result["already_complete"]:
        print(f"{result['job']} was already complete; --restart runs it again")
    else:
        state = "resumed" if result["resumed"] else "started"
        print(
            f"{result['job']} {state}: scanned {result['scanned']} chunks, enqueued {result['enqueued']} "
            f"(the rest already had a pending event); `outboxd run` applies them"
        )
    return 0


def job_name(source: UUID | None, document: UUID | None) -> str:
    if document:
        return f"backfill:document:{document}"
    if source:
        return f"backfill:source:{source}"
    return "backfill:all"


async def backfill(settings, source, document, page_size: int, restart: bool, quiet: bool = True) -> dict:
    import sys

    from daemon.commands.common import open_services, progress_bar
    from db.queries import query

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
            tty = sys.stderr.isatty() and not quiet
            # a count of every chunk in scope is a full scan: only for a bar someone watches
            total = (await (await conn.execute(query("count_chunks"), scope)).fetchone())["n"] if tty else None
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
