"""The Kafka consumer's batch loop, with the broker's clients replaced by recorders:
a batch retried after an outage parks each bad message once, not once per try."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from consumers.settings import StreamSettings
from consumers.stream_consumer import StreamConsumer
from daemon.runtime.backoff import Backoff


class Recorder:
    """Stands in for the dead-letter producer and the group consumer: what was sent,
    what was committed, and a commit that fails once as an outage would."""

    def __init__(self, commit_failures: int) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.commits: list[dict] = []
        self.commit_failures = commit_failures

    async def send_and_wait(self, topic, value, key, headers=None) -> None:
        self.sent.append((value, key))

    async def commit(self, offsets: dict) -> None:
        if self.commit_failures:
            self.commit_failures -= 1
            raise ConnectionError("the group coordinator went away")
        self.commits.append(offsets)


class RejectsTheFirst(StreamConsumer):
    async def handle(self, records):
        return [(records[0], "cannot be a payload")]


def test_a_batch_retried_after_an_outage_parks_each_bad_message_once(monkeypatch):
    monkeypatch.setattr("daemon.runtime.batch_policy.OUTAGE", Backoff(base=0.001, factor=1.0, cap=0.001))
    consumer = RejectsTheFirst(StreamSettings(), group="g")
    kafka = Recorder(commit_failures=2)
    consumer.producer = consumer.consumer = kafka
    records = [SimpleNamespace(topic="t", partition=0, offset=o, key=b"k%d" % o, value=b"v%d" % o, headers=[])
               for o in range(3)]
    asyncio.run(consumer._process("tp", records))
    assert kafka.sent == [(b"v0", b"k0")]  # three tries, one dead letter
    assert kafka.commits == [{"tp": 3}]
    assert consumer.stats.transient_retries == 2
