"""`outboxd migrate`: the schema, up (idempotent) or down, and the capture mode."""
from __future__ import annotations

import logging

import click

from daemon.commands.options import settings_options

log = logging.getLogger("outboxd")


@click.command(help="Upgrade the database schema to head (idempotent; concurrent runs wait for each other). "
               "--capture-triggers always also captures writes made with session_replication_role = replica "
               "(a logical-replication subscriber, bulk loads that set it); origin, the default, does not.")
@click.option("--downgrade", metavar="REVISION", help="downgrade to REVISION instead ('base' removes all)")
@click.option("--capture-triggers", type=click.Choice(["origin", "always"]),
              help="after upgrading, set the capture mode (kept until changed; `outboxd status` shows it)")
@settings_options()
def command(settings, downgrade: str | None, capture_triggers: str | None) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import resolve_dsn
    from db import capture, migrate
    from db.gateway import connect

    if downgrade and capture_triggers:
        raise click.UsageError("--capture-triggers sets the mode after an upgrade; not with --downgrade")
    dsn = resolve_dsn(settings)  # the embedded database migrates as it starts
    if downgrade:
        migrate.downgrade(dsn, downgrade)
        log.info("schema downgraded", extra={"revision": migrate.current_revision(dsn)})
        return 0
    if settings.database_url is not None:  # resolve_dsn upgraded the embedded one
        migrate.upgrade(dsn)
    with connect(dsn, application_name="outboxd:migrate", timeout=settings.startup_timeout, row_factory=None) as conn:
        mode = capture.set_capture_mode(conn, capture_triggers) if capture_triggers else capture.capture_mode(conn)
    log.info("schema migrated", extra={"revision": migrate.current_revision(dsn), "capture_triggers": mode})
    return 0
