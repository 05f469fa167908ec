"""`outboxd backfill`: enqueue chunks that existed before outboxd did
(daemon.admin.backfill does the work; this parses the options and prints)."""
from __future__ import annotations

import sys
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
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from daemon.commands.common import print_json

    result = asyncio.run(_backfill_with_progress(settings, source, document, page_size, restart, as_json))
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


async def _backfill_with_progress(settings, source, document, page_size: int, restart: bool,
                                  quiet: bool = True) -> dict:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.admin import backfill as work
    from daemon.commands.common import open_services, progress_bar

    async with open_services(settings, qdrant=False) as (pool, _):
        tty = sys.stderr.isatty() and not quiet
        total = await work.count_in_scope(pool, source, document) if tty else None
        with progress_bar(total, work.job_name(source, document), tty) as advance:
            return await work.backfill(pool, source, document, page_size, restart, advance)
