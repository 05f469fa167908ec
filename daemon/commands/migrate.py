"""`outboxd migrate`: the schema, up (idempotent) or down."""
from __future__ import annotations

import logging

from daemon.commands.common import resolve_dsn
from daemon.errors import EXIT_OK

log = logging.getLogger("outboxd")


def register(sub, parents) -> None:
    p = sub.add_parser("migrate", parents=parents, help="upgrade the database schema to head (idempotent)")
    p.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead ('base' removes all)")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    from db import migrate

    if settings.database_url is None:
        resolve_dsn(settings)  # the embedded database migrates as it starts
        return EXIT_OK
    dsn = settings.database_url.get_secret_value()
    if args.downgrade:
        migrate.downgrade(dsn, args.downgrade)
    else:
        migrate.upgrade(dsn)
    log.info("schema migrated", extra={"revision": migrate.current_revision(dsn)})
    return EXIT_OK
