"""`outboxd consume`: a member of the consumer group that applies the topic to Qdrant."""
from __future__ import annotations

import asyncio


def register(sub, parents) -> None:
    p = sub.add_parser(
        "consume",
        parents=parents,
        help="apply chunk events from Kafka to Qdrant until SIGTERM/SIGINT",
        description="Join consumer group OUTBOXD_KAFKA_GROUP on OUTBOXD_KAFKA_TOPIC and apply each event to "
        "the Qdrant collection through the same apply core as `outboxd run`; offsets are committed after "
        "Qdrant confirmed. Needs no database. A new group starts at the beginning of the (compacted) topic "
        "and rebuilds the collection from it.",
    )
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    from consumers.stream_consumer import run_consumer
    from consumers.kafka_clients import require_bootstrap
    from consumers.qdrant_consumer import QdrantConsumer

    require_bootstrap(settings)
    return asyncio.run(run_consumer(QdrantConsumer(settings)))
