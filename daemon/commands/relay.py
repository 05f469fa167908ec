"""`outboxd relay`: publish outbox events to Kafka (the Kafka transport's producer side)."""
from __future__ import annotations

import asyncio
import sys

from daemon.commands.common import resolve_dsn


def register(sub, parents) -> None:
    p = sub.add_parser(
        "relay",
        parents=parents,
        help="publish outbox events to the Kafka topic until SIGTERM/SIGINT",
        description="Claim outbox events like `outboxd run` and publish each changed chunk's state to "
        "OUTBOXD_KAFKA_TOPIC (key = chunk id), acknowledging them once the brokers confirmed. "
        "Several relays may run side by side.",
    )
    p.add_argument("--drain", action="store_true", help="exit 0 once no event is pending (dead letters aside)")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    from consumers.kafka_clients import require_bootstrap
    from consumers.relay import Relay
    from daemon.runtime.service import run_service

    require_bootstrap(settings)
    dsn = resolve_dsn(settings, announce_to=sys.stdout)
    return asyncio.run(run_service(Relay(settings, dsn), drain=args.drain))
