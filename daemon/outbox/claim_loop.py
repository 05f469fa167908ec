"""One worker of an outbox service: wait for work, claim a batch, deliver it,
acknowledge it. The notify daemon delivers to Qdrant, the Kafka relay to a
topic; both run this loop, with the batch policy of daemon.runtime.

Failure handling, from the outside in:
- the infrastructure fails (PostgreSQL, Qdrant, Kafka unreachable): the batch
  is retried with backoff and jitter, its lease renewed, no attempt counted
  against its events; on shutdown the claims are released;
- one chunk cannot be delivered: the batch is split so the others go through,
  and that chunk's events are retried with backoff, then parked as dead
  letters after max_attempts (invariant 6).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from contextlib import suppress
from typing import TYPE_CHECKING
from uuid import UUID

from daemon.core.batch import Target
from daemon.errors import describe, is_transient
from daemon.outbox.queue import Claim, Event
from daemon.runtime.batch_policy import wait_for_any
from daemon.telemetry import record_span, span

if TYPE_CHECKING:
    from daemon.outbox.service import OutboxService

log = logging.getLogger(__name__)

OUTAGE_BACKOFF_MAX = 30.0


class ClaimLoop:
    def __init__(self, name: str, service: "OutboxService", *, drain: bool = False) -> None:
        self.name = name
        self.service = service
        self.drain = drain

    async def run(self) -> None:
        """Until stop is set; in drain mode, also until nothing is pending."""
        svc = self.service
        outage = 0.5
        while not svc.stop.is_set():
            svc.heartbeat.beat()
            ticket = svc.wakeup.ticket()
            try:
                claim_started = time.time_ns()
                claim = await svc.outbox.claim(svc.settings.batch_size)
                if not claim:
                    timeout = svc.settings.poll_interval
                    if self.drain:
                        summary = await svc.outbox.pending()
                        if summary.pending == 0:
                            return
                        timeout = min(timeout, summary.wait_seconds or timeout)
                    await wait_for_any([ticket, svc.stop], timeout)
                    continue
                outage = 0.5
            except Exception as exc:
                if not is_transient(exc):
                    raise
                svc.policy.note_outage("claim", exc, outage)
                log.warning("cannot claim; retrying", extra={"error": describe(exc), "retry_in": outage})
                await wait_for_any([svc.stop], outage)
                outage = min(outage * 2, OUTAGE_BACKOFF_MAX)
                continue
            await self.process(claim, claimed=(claim_started, time.time_ns()))
            if self.drain:  # let the other workers see at once whether anything is left
                svc.wakeup.fire()

    async def process(self, claim: Claim, claimed: tuple[int, int]) -> None:
        """Deliver and acknowledge one claimed batch, in one trace (claimed: when
        its claim started and ended, in time.time_ns())."""
        svc = self.service
        started = time.perf_counter()
        svc.heartbeat.busy(self.name)
        svc.metrics.batch_size.record(len(claim))
        with span(
            "outboxd.batch",
            start_time=claimed[0],
            events=len(claim),
            chunks=len({e.chunk_id for e in claim}),
            worker=self.name,
        ):
            record_span("claim", *claimed, events=len(claim))
            try:
                await self._process_claimed(claim)
            finally:
                svc.heartbeat.idle(self.name)
                svc.metrics.batch_seconds.record((claimed[1] - claimed[0]) / 1e9 + time.perf_counter() - started)

    async def _process_claimed(self, claim: Claim) -> None:
        svc = self.service
        ids = [e.id for e in claim]
        renewer = asyncio.create_task(self._renew(ids))
        states = claim.states  # read with the claim; an outage retry reads them again
        try:
            async for attempt in svc.policy.retrying(self.name):
                with attempt:
                    current, states = states, None
                    await self._once(claim, current)
        except asyncio.CancelledError:
            # Shutdown ran out of time: hand the claims back so another worker
            # takes them now instead of after the lease.
            with suppress(Exception):
                await asyncio.wait_for(svc.outbox.release(ids), 5)
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Only reached when stopping during an outage.
            with suppress(Exception):
                await asyncio.wait_for(svc.outbox.release(ids), 5)
            log.warning("stopped during an outage; claims released", extra={"events": len(ids)})
        finally:
            renewer.cancel()

    async def _renew(self, ids: list[int]) -> None:
        svc = self.service
        while True:
            await asyncio.sleep(svc.settings.lease_seconds / 3)
            try:
                await svc.outbox.renew(ids)
            except Exception as exc:  # noqa: BLE001 - a missed renewal only risks duplicate work
                log.warning("lease renewal failed", extra={"error": describe(exc)})

    async def _once(self, events: list[Event], states) -> None:
        svc = self.service
        started = time.perf_counter()
        events_of: dict[UUID, list[Event]] = defaultdict(list)
        for e in events:
            events_of[e.chunk_id].append(e)
        if states is None:
            with span("read_states", chunks=len(events_of)):
                states = await svc.outbox.chunk_states(list(events_of))
        targets = {cid: Target(states.get(cid)) for cid in events_of}
        with span("apply", chunks=len(targets)) as applying:
            outcome = await svc.policy.deliver(lambda t: svc.deliver(t, events_of), targets, svc.result_type)
            applying.set_attributes({**outcome.counts(), "failed": len(outcome.failed)})

        with span("ack", chunks=len(outcome.written), failed=len(outcome.failed)) as acking:
            acked = released = 0
            if outcome.written:
                written_ids = [e.id for cid in outcome.written for e in events_of[cid]]
                acked, released = await svc.outbox.ack_verified(written_ids, outcome.written)
            acking.set_attributes({"acked": acked, "released": released})
            for cid, error in outcome.failed.items():
                await self._fail(cid, error, [e.id for e in events_of[cid]], svc.result_type.op_for(targets[cid]))
        svc.policy.record(outcome, acked=acked, released=released)
        log.debug(
            "batch applied",
            extra={"worker": self.name, "events": len(events), "chunks": len(events_of), "acked": acked,
                   "released": released, "failed": len(outcome.failed), **outcome.counts(),
                   "seconds": round(time.perf_counter() - started, 4)},
        )

    async def _fail(self, chunk_id: UUID, error: str, event_ids: list[int], op: str) -> None:
        s = self.service.settings
        rows = await self.service.outbox.fail(
            event_ids, error, max_attempts=s.max_attempts, backoff_base=s.retry_backoff_base,
            backoff_max=s.retry_backoff_max,
        )
        dead = [r for r in rows if r["status"] == "dead"]
        self.service.policy.record_failure(op, failed=len(rows) - len(dead), dead=len(dead))
        log.log(
            logging.ERROR if dead else logging.WARNING,
            "chunk parked as a dead letter" if dead else "chunk failed; will retry with backoff",
            extra={"chunk_id": str(chunk_id), "error": error,
                   "attempts": max((r["attempts"] for r in rows), default=0), "event_ids": [r["id"] for r in rows]},
        )
