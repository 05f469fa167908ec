"""`outboxd status`: what an operator (or a probe) needs at a glance: the
backlog and its lag, the relay's share of it, leases by worker, retries and
dead letters, the capture-trigger mode, the continuous verifier (its holder,
how far its pass is, its last full pass, the drift it found), the catalog of
collections, and the live Qdrant collection with its point count and model.

With --max-lag / --max-pending / --max-dead-letters it exits 3 (a check found
a problem) when a limit is passed, and says which on stderr, so cron or a
monitoring probe can alert; an unreachable PostgreSQL is 69, not 3.

What it reads is daemon.admin.status's; how it shows it, daemon.commands.status_render's.
"""
from __future__ import annotations

import sys

import click

from daemon.commands.options import json_option, settings_options, verdict
from daemon.errors import EXIT_CHECK_FAILED, EXIT_CONFIG


@click.command(help="Show the outbox backlog and lag, the relay (Kafka transport), leases by worker, retries, "
               "dead letters, the capture-trigger mode, the continuous verifier, the collection catalog and the "
               "live Qdrant collection. "
               "With a --max-* limit, exit 3 when it is passed.")
@json_option
@click.option("--max-lag", type=click.FloatRange(min=0), metavar="SECONDS",
              help="exit 3 if the oldest pending event is older than this")
@click.option("--max-pending", type=click.IntRange(min=0), metavar="N", help="exit 3 if more than N events are pending")
@click.option("--max-dead-letters", type=click.IntRange(min=0), metavar="N",
              help="exit 3 if there are more than N dead letters")
@settings_options(qdrant=True, settings="stream_settings")  # the Kafka wing's, where it is installed
def command(settings, as_json: bool, max_lag: float | None, max_pending: int | None,
            max_dead_letters: int | None) -> int:
    # deferred like every command's: the readers and the tables pull in psycopg, qdrant-client and rich
    import asyncio

    from daemon.commands.common import print_json
    from daemon.commands.status_render import render, thresholds

    limits = {"max_lag": max_lag, "max_pending": max_pending, "max_dead_letters": max_dead_letters}
    report = asyncio.run(_gather(settings))
    report["thresholds"] = thresholds(limits, report["outbox"])
    exceeded = [t["message"] for t in report["thresholds"].values() if t["exceeded"]]
    # what it could read is printed either way; a Qdrant setting that cannot work is 78, as for every command
    misconfigured = report["qdrant"]["reason"] if report["qdrant"].get("config_error") else None
    code = verdict(EXIT_CONFIG if misconfigured else EXIT_CHECK_FAILED if exceeded else 0)
    if as_json:
        print_json(report)
    else:
        render(report)
    note = report["capture"]["note"]
    if note and as_json:  # the tables say it on stdout
        print(f"outboxd status: capture mode {report['capture']['mode']}: {note}", file=sys.stderr)
    for message in exceeded:
        print(f"outboxd status: {message}", file=sys.stderr)
    if misconfigured:
        print(f"outboxd status: {misconfigured}", file=sys.stderr)
    return code


async def _gather(settings) -> dict:
    """daemon.admin.status.gather on a small pool: a refusal (78) or an outage of PostgreSQL
    (69, with the stopped-embedded hint) is the exit-code contract's to report."""
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.admin.status import gather
    from daemon.commands.common import open_services
    from db.reads import OperatorReads

    async with open_services(settings, qdrant=False) as (pool, _):
        return await gather(settings, OperatorReads(pool))
