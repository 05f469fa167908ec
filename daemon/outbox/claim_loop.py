"""One claim loop: wait for work, claim a batch, apply it, acknowledge it.

Failure handling, from the outside in:
- the infrastructure fails (PostgreSQL or Qdrant unreachable): the batch is
  retried with exponential backoff and jitter, its lease renewed, no attempt
  counted against its events; on shutdown the claims are released;
- one chunk cannot be applied: the batch is split so the others go through,
  and that chunk's events are retried with backoff, then parked as dead
  letters after max_attempts (invariant 6).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from daemon.core.apply import ApplyResult, isolate
from daemon.core.chunk_state import ChunkState
from daemon.config import Settings
from daemon.errors import describe, is_transient
from daemon.runtime.health import Heartbeat
from daemon.outbox.listener import Wakeup
from daemon.outbox.queue import Event, Outbox
from daemon.telemetry import Metrics, get_metrics, record_span, span

log = logging.getLogger(__name__)


@dataclass
class Stats:
    batches: int = 0
    events_acked: int = 0
    events_released: int = 0
    events_failed: int = 0
    dead_letters: int = 0
    upserted: int = 0
    payload_only: int = 0
    deleted: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0
    transient_retries: int = 0

    def add(self, result: ApplyResult) -> None:
        for name in ("upserted", "payload_only", "deleted", "unchanged", "embedded", "reused"):
            setattr(self, name, getattr(self, name) + getattr(result, name))


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


async def wait_for_any(events: list[asyncio.Event], timeout: float | None) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class BatchSink(Protocol):
    """Where a worker's batches go: the Applier (Qdrant) or the relay's Publisher
    (Kafka). Given the current state of each chunk (None: gone) and the claimed
    events behind it, make the destination reflect those states; report which
    state hash each chunk now has there, and which chunks failed by their own fault."""

    async def apply(
        self, targets: dict[UUID, ChunkState | None], events: dict[UUID, list[Event]] | None = None
    ) -> ApplyResult: ...


class Worker:
    def __init__(
        self,
        name: str,
        settings: Settings,
        outbox: Outbox,
        applier: BatchSink,
        wakeup: Wakeup,
        stop: asyncio.Event,
        stats: Stats,
        *,
        drain: bool = False,
        metrics: Metrics | None = None,
        heartbeat: Heartbeat | None = None,
        events_op: str | None = None,
        on_batch: Callable[[ApplyResult], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.outbox = outbox
        self.applier = applier
        self.wakeup = wakeup
        self.stop = stop
        self.stats = stats
        self.drain = drain
        self.metrics = metrics or get_metrics()
        self.heartbeat = heartbeat or Heartbeat()
        # the op every finished event is counted under (the relay: "published");
        # None: by what the sink did to its chunk (upsert, payload, delete, unchanged)
        self.events_op = events_op
        self.on_batch = on_batch

    async def run(self) -> None:
        """Until stop is set; in drain mode, also until nothing is pending."""
        outage = 0.5
        while not self.stop.is_set():
            self.heartbeat.beat()
            ticket = self.wakeup.ticket()
            try:
                claim_started = time.time_ns()
                events = await self.outbox.claim(self.settings.batch_size)
                if not events:
                    timeout = self.settings.poll_interval
                    if self.drain:
                        summary = await self.outbox.pending()
                        if summary.pending == 0:
                            return
                        timeout = min(timeout, summary.wait_seconds or timeout)
                    await wait_for_any([ticket, self.stop], timeout)
                    continue
                outage = 0.5
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.stats.transient_retries += 1
                self.metrics.retries.add(1, {"stage": "claim"})
                log.warning("cannot claim; retrying", extra={"error": describe(exc), "retry_in": outage})
                await wait_for_any([self.stop], outage)
                outage = min(outage * 2, 30.0)
                continue
            await self.process(events, claimed=(claim_started, time.time_ns()))
            if self.drain:  # let the other workers see at once whether anything is left
                self.wakeup.fire()

    async def process(self, events: list[Event], claimed: tuple[int, int] | None = None) -> None:
        """Apply and acknowledge one claimed batch, in one trace (claimed: when
        its claim started and ended, in time.time_ns())."""
        started = time.perf_counter()
        self.heartbeat.busy(self.name)
        self.metrics.batch_size.record(len(events))
        with span(
            "outboxd.batch",
            start_time=claimed[0] if claimed else None,
            events=len(events),
            chunks=len({e.chunk_id for e in events}),
            worker=self.name,
        ):
            if claimed:
                record_span("claim", *claimed, events=len(events))
            try:
                await self._process_claimed(events)
            finally:
                self.heartbeat.idle(self.name)
                claim_seconds = (claimed[1] - claimed[0]) / 1e9 if claimed else 0.0
                self.metrics.batch_seconds.record(claim_seconds + time.perf_counter() - started)

    async def _process_claimed(self, events: list[Event]) -> None:
        ids = [e.id for e in events]
        renewer = asyncio.create_task(self._renew(ids))
        try:
            await self._process_with_retry(events)
        except asyncio.CancelledError:
            # Shutdown ran out of time: hand the claims back so another worker
            # takes them now instead of after the lease.
            with suppress(Exception):
                await asyncio.wait_for(self.outbox.release(ids), 5)
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Only reached when stopping during an outage.
            with suppress(Exception):
                await asyncio.wait_for(self.outbox.release(ids), 5)
            log.warning("stopped during an outage; claims released", extra={"events": len(ids)})
        finally:
            renewer.cancel()

    async def _renew(self, ids: list[int]) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.outbox.renew(ids)
            except Exception as exc:  # noqa: BLE001 - a missed renewal only risks duplicate work
                log.warning("lease renewal failed", extra={"error": describe(exc)})

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        await wait_for_any([self.stop], seconds)

    def _log_retry(self, retry_state) -> None:
        self.stats.transient_retries += 1
        self.metrics.retries.add(1, {"stage": "batch"})
        self.heartbeat.busy(self.name)  # waiting out an outage is progress, not a stuck worker
        log.warning(
            "PostgreSQL or Qdrant unavailable; retrying the batch",
            extra={
                "error": describe(retry_state.outcome.exception()),
                "attempt": retry_state.attempt_number,
                "retry_in": round(retry_state.upcoming_sleep, 2),
            },
        )

    async def _process_with_retry(self, events: list[Event]) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(multiplier=0.5, max=30.0),
            stop=lambda _state: self.stop.is_set(),
            sleep=self._sleep_unless_stopped,
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._process_once(events)

    async def _process_once(self, events: list[Event]) -> None:
        started = time.perf_counter()
        events_of: dict[UUID, list[Event]] = defaultdict(list)
        for e in events:
            events_of[e.chunk_id].append(e)
        chunk_ids = list(events_of)
        with span("read_states", chunks=len(chunk_ids)):
            states = await self.outbox.chunk_states(chunk_ids)
        targets = {cid: states.get(cid) for cid in chunk_ids}
        with span("apply", chunks=len(targets)) as applying:
            try:
                result = await self.applier.apply(targets, events_of)
            except Exception as exc:
                if is_transient(exc):
                    raise
                result = await isolate(
                lambda cid: self.applier.apply({cid: targets[cid]}, {cid: events_of[cid]}), list(targets), exc
            )
            applying.set_attributes(
                {
                    "upserted": result.upserted,
                    "payload_only": result.payload_only,
                    "deleted": result.deleted,
                    "embedded": result.embedded,
                    "failed": len(result.failed),
                }
            )

        by_chunk = {cid: [e.id for e in evs] for cid, evs in events_of.items()}
        with span("ack", chunks=len(result.written), failed=len(result.failed)) as acking:
            if result.written:
                written_ids = [i for cid in result.written for i in by_chunk[cid]]
                acked, released = await self.outbox.ack_verified(written_ids, result.written)
                self.stats.events_acked += acked
                self.stats.events_released += released
            else:
                acked = released = 0
            acking.set_attributes({"acked": acked, "released": released})
            if result.failed:
                await self._fail(result.failed, by_chunk, targets)
        self.stats.batches += 1
        self.stats.add(result)
        self._record(result, acked, released)
        log.debug(
            "batch applied",
            extra={
                "worker": self.name,
                "events": len(events),
                "chunks": len(chunk_ids),
                "acked": acked,
                "released": released,
                "failed": len(result.failed),
                "upserted": result.upserted,
                "payload_only": result.payload_only,
                "deleted": result.deleted,
                "embedded": result.embedded,
                "seconds": round(time.perf_counter() - started, 4),
            },
        )

    def _record(self, result: ApplyResult, acked: int, released: int) -> None:
        """Metrics of one applied batch. The acknowledgement counts events per
        batch, not per chunk: they are split over the ops in proportion to the
        chunks of each op (exact when one op holds the batch, the common case)."""
        if self.events_op is not None:
            weights = {self.events_op: 1}
        else:
            weights = {
                "upsert": result.upserted,
                "payload": result.payload_only,
                "delete": result.deleted,
                "unchanged": result.unchanged,
            }
            weights["published"] = len(result.written) - sum(weights.values())  # a sink that only forwards
        for outcome, total in (("ok", acked), ("released", released)):
            for op, n in apportion(total, weights).items():
                self.metrics.events_applied.add(n, {"op": op, "result": outcome})
        if self.events_op is None:
            for kind, n in result.embedding_kinds().items():
                if n:
                    self.metrics.embeddings.add(n, {"kind": kind})
        if self.on_batch is not None:
            try:
                self.on_batch(result)
            except Exception as exc:  # noqa: BLE001 - metrics never fail a batch
                log.debug("batch observer failed", extra={"error": describe(exc)})

    async def _fail(
        self,
        failed: dict[UUID, str],
        by_chunk: dict[UUID, list[int]],
        targets: dict[UUID, ChunkState | None] | None = None,
    ) -> None:
        s = self.settings
        for cid, error in failed.items():
            rows = await self.outbox.fail(
                by_chunk[cid],
                error,
                max_attempts=s.max_attempts,
                backoff_base=s.retry_backoff_base,
                backoff_max=s.retry_backoff_max,
            )
            dead = [r for r in rows if r["status"] == "dead"]
            self.stats.events_failed += len(rows)
            self.stats.dead_letters += len(dead)
            state = targets.get(cid) if targets else None
            gone = targets is not None and (state is None or not state.has_text)
            op = self.events_op or ("delete" if gone else "upsert")
            if len(rows) > len(dead):
                self.metrics.events_applied.add(len(rows) - len(dead), {"op": op, "result": "failed"})
            if dead:
                self.metrics.events_applied.add(len(dead), {"op": op, "result": "dead"})
                self.metrics.dead_letters.add(len(dead))
            level = logging.ERROR if dead else logging.WARNING
            log.log(
                level,
                "chunk parked as a dead letter" if dead else "chunk failed; will retry with backoff",
                extra={
                    "chunk_id": str(cid),
                    "error": error,
                    "attempts": max((r["attempts"] for r in rows), default=0),
                    "event_ids": [r["id"] for r in rows],
                },
            )
