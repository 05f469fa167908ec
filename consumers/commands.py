"""The Kafka transport's commands: `outboxd relay` (outbox -> topic), `outboxd
consume` (topic -> Qdrant, a consumer-group member) and `outboxd tail` (print
the stream). daemon.cli finds them here by name (COMMANDS), so the core never
imports the Kafka wing; like every command module, this one imports only
click at module level: aiokafka and the rest load when a command runs.
"""
from __future__ import annotations

import sys

import click

from daemon.commands.options import settings_options

SETTINGS = "consumers.settings:StreamSettings"  # the core's settings and the [kafka] table


@click.command(help="Claim outbox events like `outboxd run` and publish each changed chunk's state to "
               "OUTBOXD_KAFKA__TOPIC (key = chunk id), acknowledging them once the brokers confirmed, until "
               "SIGTERM/SIGINT. Several relays may run side by side. Needs KAFKA_BOOTSTRAP_SERVERS.")
@click.option("--drain", is_flag=True, help="exit 0 once no event is pending (dead letters aside)")
@settings_options(settings=SETTINGS)
def relay(settings, drain: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from consumers.kafka_clients import require_bootstrap
    from consumers.relay import Relay
    from daemon.commands.common import resolve_dsn
    from daemon.runtime.service import run_service

    require_bootstrap(settings)
    dsn = resolve_dsn(settings, announce_to=sys.stdout)
    return asyncio.run(run_service(Relay(settings, dsn), exit_deadline=True, drain=drain))


@click.command(help="Join consumer group OUTBOXD_KAFKA__GROUP on OUTBOXD_KAFKA__TOPIC and apply each event to "
               "the Qdrant collection through the same apply core as `outboxd run`, until SIGTERM/SIGINT; "
               "offsets are committed after Qdrant confirmed. Needs no database. A new group starts at the "
               "beginning of the (compacted) topic and rebuilds the collection from it.")
@settings_options(qdrant=True, settings=SETTINGS)
def consume(settings) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from consumers.kafka_clients import require_bootstrap
    from consumers.qdrant_consumer import QdrantConsumer
    from daemon.runtime.service import run_service

    require_bootstrap(settings)
    return asyncio.run(run_service(QdrantConsumer(settings), exit_deadline=True))


@click.command(help="Read OUTBOXD_KAFKA__TOPIC without a consumer group (nothing committed, no effect on other "
               "readers) and print one line per event as it arrives. Ends quietly when its reader goes away "
               "(`outboxd tail | head`).")
@click.option("--from-beginning", is_flag=True, help="start at the oldest event kept, not the newest")
@click.option("--document", type=click.UUID, multiple=True, metavar="ID", help="only this document (repeatable)")
@click.option("--source", type=click.UUID, multiple=True, metavar="ID", help="only this source (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print each event as its JSON message")
@click.option("-n", "--limit", type=click.IntRange(min=1), metavar="N", help="exit after printing this many events")
@settings_options(settings=SETTINGS)
def tail(settings, from_beginning: bool, document: tuple, source: tuple, as_json: bool, limit: int | None) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from consumers.kafka_clients import require_bootstrap
    from consumers.tail import TailConsumer
    from daemon.runtime.service import run_service

    require_bootstrap(settings)
    consumer = TailConsumer(
        settings,
        from_beginning=from_beginning,
        documents=set(document),
        sources=set(source),
        as_json=as_json,
        limit=limit,
    )
    return asyncio.run(run_service(consumer, exit_deadline=True))
