"""`outboxd run`: the daemon (notify transport)."""
from __future__ import annotations

import sys

import click

from daemon.commands.options import settings_options


@click.command(help="Run the daemon until SIGTERM/SIGINT: claim outbox events, embed, write Qdrant, acknowledge. "
               "Without DATABASE_URL it starts an embedded PostgreSQL and prints its URL.")
@click.option("--drain", is_flag=True, help="exit 0 once no event is pending (dead letters aside)")
@settings_options(qdrant=True)
def command(settings, drain: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from daemon.commands.common import resolve_dsn
    from daemon.outbox.notify_daemon import NotifyDaemon
    from daemon.runtime.service import run_service

    dsn = resolve_dsn(settings, announce_to=sys.stdout)
    return asyncio.run(run_service(NotifyDaemon(settings, dsn), exit_deadline=True, drain=drain))
