"""`outboxd run`: the daemon."""
from __future__ import annotations

import asyncio
import sys

from daemon.commands.common import resolve_dsn


def register(sub, parents) -> None:
    p = sub.add_parser(
        "run",
        parents=parents,
        help="run the daemon until SIGTERM/SIGINT",
        description="Run the daemon. Without DATABASE_URL it starts an embedded PostgreSQL and prints its URL.",
    )
    p.add_argument("--drain", action="store_true", help="exit 0 once no event is pending (dead letters aside)")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    from daemon.runtime.service import run_service
    from daemon.outbox.notify_daemon import Daemon

    dsn = resolve_dsn(settings, announce_to=sys.stdout)
    return asyncio.run(run_service(Daemon(settings, dsn), drain=args.drain))
