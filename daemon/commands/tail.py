"""`outboxd tail`: print the chunk change stream."""
from __future__ import annotations

import argparse
import asyncio
from uuid import UUID


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def register(sub, parents) -> None:
    p = sub.add_parser(
        "tail",
        parents=parents,
        help="print chunk events from the Kafka topic as they arrive",
        description="Read OUTBOXD_KAFKA_TOPIC without a consumer group (nothing committed, no effect on "
        "other readers) and print one line per event.",
    )
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest event kept, not the newest")
    p.add_argument("--document", type=_uuid, action="append", default=[], help="only this document (repeatable)")
    p.add_argument("--source", type=_uuid, action="append", default=[], help="only this source (repeatable)")
    p.add_argument("--json", action="store_true", help="print each event as its JSON message")
    p.add_argument("-n", "--limit", type=int, default=None, help="exit after printing this many events")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    from consumers.stream_consumer import run_consumer
    from consumers.kafka_clients import require_bootstrap
    from consumers.tail import TailConsumer

    require_bootstrap(settings)
    consumer = TailConsumer(
        settings,
        from_beginning=args.from_beginning,
        documents=set(args.document),
        sources=set(args.source),
        as_json=args.json,
        limit=args.limit,
    )
    return asyncio.run(run_consumer(consumer))
