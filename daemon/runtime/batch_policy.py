"""How every transport treats one batch, in one place:

- retry: an outage (PostgreSQL, Qdrant, Kafka or the embedding endpoint
  unreachable) is retried with exponential backoff and jitter until it passes
  or the process stops, counted per dependency, never against the events;
- isolate: a batch that fails for another reason is applied chunk by chunk, so
  only the chunk at fault is held back (invariant 6);
- record: what a finished batch did goes into the stats and the metrics.

The notify daemon's claim loop, the Kafka relay and the Kafka consumer each
supply only how they get work, apply it and acknowledge it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, TypeVar

from daemon.core.batch import Outcome, Targets
from daemon.errors import Failure, classify, dependency_of, describe, refusal
from daemon.runtime.backoff import OUTAGE
from daemon.runtime.health import Heartbeat
from daemon.runtime.retry import Failed, Retry
from daemon.telemetry import Metrics

log = logging.getLogger(__name__)

O = TypeVar("O", bound=Outcome)
Sink = Callable[[Targets], Awaitable[O]]


@dataclass
class Stats:
    """A process's running totals, logged as `progress` and at exit."""

    batches: int = 0
    events_acked: int = 0
    events_released: int = 0
    events_failed: int = 0
    dead_letters: int = 0
    transient_retries: int = 0
    upserted: int = 0
    payload_only: int = 0
    deleted: int = 0
    unchanged: int = 0
    older: int = 0
    embedded: int = 0
    reused: int = 0
    rewritten: int = 0  # points written again with the vector they hold (a sparse vector, a new layout)
    published: int = 0
    records: int = 0  # Kafka messages consumed: applied or parked in the dead-letter topic

    # The totals that outcomes feed, by the name of the Outcome counter each sums.
    # Named here, not looked up: an outcome counter missing from this list is an
    # error, never a metric silently dropped.
    FROM_OUTCOMES: ClassVar[tuple[str, ...]] = (
        "upserted", "payload_only", "deleted", "unchanged", "older", "rewritten", "embedded", "reused", "published",
    )

    def add(self, outcome: Outcome) -> None:
        for name, value in outcome.counts().items():
            if name not in self.FROM_OUTCOMES:
                raise TypeError(f"{type(outcome).__name__} counts {name!r}, which Stats does not keep: "
                                "add a Stats field of that name and list it in Stats.FROM_OUTCOMES")
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def apportion(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split total in proportion to weights (largest remainder; exact where one
    weight holds everything)."""
    weights = {k: w for k, w in weights.items() if w > 0}
    whole = sum(weights.values())
    if total <= 0 or not whole:
        return {}
    shares = {k: total * w // whole for k, w in weights.items()}
    by_remainder = sorted(weights, key=lambda k: (total * weights[k]) % whole, reverse=True)
    for k in by_remainder[: total - sum(shares.values())]:
        shares[k] += 1
    return {k: n for k, n in shares.items() if n}


def beyond_the_chunk(exc: Exception) -> Exception | None:
    """What no chunk is at fault for, as the error to raise: an outage (the batch
    is retried whole), a configuration that cannot work (a changed model), a
    server's refusal (a revoked key) as its ConfigError. None: a chunk's own failure."""
    failure = classify(exc)
    if failure is Failure.REFUSAL:
        return refusal(exc)
    return None if failure is Failure.OTHER else exc


class BatchPolicy:
    def __init__(self, stop: asyncio.Event, metrics: Metrics, stats: Stats, heartbeat: Heartbeat) -> None:
        self.stop = stop
        self.metrics = metrics
        self.stats = stats
        self.heartbeat = heartbeat

    # --- retry -----------------------------------------------------------------------
    def note_outage(self, stage: str, exc: BaseException, wait: float, busy: str | None = None) -> None:
        """Count one retry after an outage (the metric, per dependency, and the stats)."""
        dependency = dependency_of(exc)
        self.stats.transient_retries += 1
        self.metrics.retries.add(1, {"stage": stage, "dependency": dependency})
        self.metrics.dependency_wait_seconds.add(wait, {"dependency": dependency})
        if busy is not None:
            self.heartbeat.busy(busy)  # waiting out an outage is progress, not a stuck batch

    def retrying(self, busy: str) -> Retry:
        """Retry a batch through outages with backoff and jitter until they pass or
        the process stops (then Stopped, for the caller to release its work)."""

        def on_retry(failed: Failed) -> None:
            exc = failed.error
            self.note_outage("batch", exc, failed.delay, busy)
            log.warning(
                f"{dependency_of(exc)} unavailable; retrying the batch",
                extra={"error": describe(exc), "attempt": failed.attempt, "retry_in": round(failed.delay, 2)},
            )

        return Retry(OUTAGE, stop=self.stop, on_retry=on_retry)

    def outage_retry(self, stage: str, message: str) -> Retry:
        """Retry one step of a worker's loop (the claim, the Kafka poll) through
        outages until they pass or the process stops; each retry counted for
        `stage`, logged as `message`, and a beat of the heartbeat, as the loop's
        own turn would have been."""

        def on_retry(failed: Failed) -> None:
            self.note_outage(stage, failed.error, failed.delay)
            self.heartbeat.beat()
            log.warning(message, extra={"error": describe(failed.error), "retry_in": round(failed.delay, 2)})

        return Retry(OUTAGE, stop=self.stop, on_retry=on_retry)

    # --- isolate ---------------------------------------------------------------------
    async def deliver(self, sink: Sink[O], targets: Targets, result_type: type[O]) -> O:
        """sink(targets); where that fails for a reason that is not an outage,
        sink per chunk, so only the chunks at fault fail. An outage on the way is
        raised, to retry the whole batch; so is a configuration that cannot work
        (a refused API key, a changed model), which no chunk is at fault for,
        as the ConfigError that stops the process (exit 78)."""
        try:
            return await sink(targets)
        except Exception as exc:  # noqa: BLE001 - what is beyond the chunk is raised just below
            if (beyond := beyond_the_chunk(exc)) is not None:
                raise beyond
            if len(targets) == 1:
                return result_type(failed={next(iter(targets)): describe(exc)})
            log.warning("batch failed; applying its chunks one by one", extra={"error": describe(exc)})
        combined = result_type()
        for chunk_id, target in targets.items():
            try:
                combined.merge(await sink({chunk_id: target}))
            except Exception as one:  # noqa: BLE001 - as above
                if (beyond := beyond_the_chunk(one)) is not None:
                    raise beyond
                combined.failed[chunk_id] = describe(one)
        return combined

    # --- record ----------------------------------------------------------------------
    def record(self, outcome: Outcome, *, acked: int, released: int = 0) -> None:
        """A finished batch: its stats and metrics. Events are counted per batch,
        not per chunk, so they are split over the ops in proportion to the chunks
        of each op (exact when one op holds the batch, the common case)."""
        self.stats.batches += 1
        self.stats.events_acked += acked
        self.stats.events_released += released
        self.stats.add(outcome)
        weights = outcome.ops()
        for result, total in (("ok", acked), ("released", released)):
            for op, n in apportion(total, weights).items():
                self.metrics.events_applied.add(n, {"op": op, "result": result})
        for kind, n in outcome.embedding_kinds().items():
            if n:
                self.metrics.embeddings.add(n, {"kind": kind})

    def record_failure(self, op: str, *, failed: int, dead: int) -> None:
        """Events of a chunk that failed by its own fault: `failed` will be retried
        with backoff, `dead` are parked as dead letters."""
        self.stats.events_failed += failed + dead
        self.stats.dead_letters += dead
        if failed:
            self.metrics.events_applied.add(failed, {"op": op, "result": "failed"})
        if dead:
            self.metrics.events_applied.add(dead, {"op": op, "result": "dead"})
            self.metrics.dead_letters.add(dead)

