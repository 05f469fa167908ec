"""An outbox service: the process shell (daemon.runtime.service) around
`concurrency` claim loops, with the pool, the schema check, the LISTEN
wake-up and the backlog gauges. The notify daemon (daemon.outbox.notify_daemon)
and the Kafka relay (consumers.relay) are the two; each supplies only where a
batch goes: start_sink() and deliver().

One claim loop (ClaimLoop, below) is one worker: wait for work, claim a batch,
deliver it, acknowledge it, with the batch policy of daemon.runtime.

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
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import replace
from uuid import UUID

from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from daemon.config import Settings
from daemon.core.batch import Outcome, Targets
from daemon.errors import SchemaNotReadyError, ServiceUnavailableError, describe
from daemon.outbox.listener import Listener, Wakeup
from daemon.outbox.queue import Claim, Event, Outbox
from daemon.runtime.backoff import EVENTS
from daemon.runtime.retry import Stopped, wait_for_any
from daemon.runtime.service import READINESS_TIMEOUT, Service, Worker
from daemon.telemetry import record_span, span
from db import migrate
from db.gateway import make_pool, ping, probe
from db.outbox import OutboxRepository

log = logging.getLogger(__name__)

BACKLOG_EVERY = 5.0  # seconds between backlog reads (metrics, systemd STATUS, heartbeat)
POOL_WAIT = 10.0  # seconds a query waits for a connection before it counts as an outage (and is retried)


class OutboxService(Service):
    result_type: type[Outcome] = Outcome

    def __init__(self, settings: Settings, dsn: str) -> None:
        super().__init__(settings)
        self.dsn = dsn
        self.wakeup = Wakeup()
        self.pool: AsyncConnectionPool | None = None
        self.outbox: Outbox | None = None
        self.first_batch_seen = False  # the first batch is logged at INFO

    # --- what differs between the notify daemon and the relay --------------------------
    async def start_sink(self) -> str | None:
        """Get the destination ready; return the Qdrant collection it writes (the
        acknowledgement then refuses once a reindex retired it), or None."""
        raise NotImplementedError

    async def deliver(self, targets: Targets, events: dict[UUID, list[Event]]) -> Outcome:
        """Make the destination reflect these targets (the events behind them, for a sink that forwards them)."""
        raise NotImplementedError

    async def close_sink(self) -> None:
        """Close what start_sink opened."""

    def describe(self) -> dict:
        """What the 'running' log line says about the sink."""
        return {}

    # --- readiness and secrets ------------------------------------------------------
    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {"postgresql": self._ready_postgresql, "migrations": self._ready_migrations} | super().readiness_checks()

    async def _ready_postgresql(self) -> None:
        if self.pool is None:
            raise ServiceUnavailableError("not connected yet")
        await ping(self.pool, timeout=READINESS_TIMEOUT)

    async def _revisions(self) -> tuple[str | None, str]:
        """(the database's schema revision, the one this outboxd needs)."""
        return await migrate.schema_revision(self.pool), migrate.head_revision()

    async def _ready_migrations(self) -> None:
        current, head = await self._revisions()
        if current != head:
            raise SchemaNotReadyError(f"schema at revision {current or 'none'}, this outboxd needs {head}")

    def extra_secrets(self) -> list[str]:
        with suppress(Exception):
            return [conninfo_to_dict(self.dsn).get("password") or ""]
        return []

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, check the schema, start the sink. Unreachable services are
        waited for up to startup_timeout."""
        s = self.settings
        self.pool = make_pool(
            self.dsn, application_name=s.application_name, min_size=s.pool_min_size, max_size=s.pool_max_size,
            timeout=POOL_WAIT,
        )
        await self.until_reachable("PostgreSQL", self._open_pool)
        await self._check_schema()
        collection = await self.start_sink()
        self.outbox = Outbox(self.pool, s.worker_name, s.lease_seconds, collection=collection)
        self.started = True

    async def _open_pool(self) -> None:
        # Not open(wait=True): a pool that times out waiting closes for good, so a
        # PostgreSQL back within the start-up timeout would never be reached again.
        # The open pool keeps connecting in the background; each try asks it for one.
        await probe(self.dsn, application_name=self.settings.application_name, timeout=10.0)
        await self.pool.open()
        await ping(self.pool, timeout=min(10.0, self.settings.startup_timeout))

    async def _check_schema(self) -> None:
        current, head = await self._revisions()
        if current != head:
            raise SchemaNotReadyError(
                f"the database schema is at revision {current or 'none'} but this outboxd needs {head}. "
                "Run `outboxd migrate` (with the same DATABASE_URL) first."
            )

    async def close(self) -> None:
        with suppress(Exception):
            await self.close_sink()
        if self.pool is not None:
            with suppress(Exception):
                await self.pool.close(timeout=2.0)

    # --- running ----------------------------------------------------------------------------
    def side_tasks(self):
        return super().side_tasks() | {"listener": self._listen, "backlog": self._watch_backlog}

    async def _listen(self) -> None:
        s = self.settings
        await Listener(self.dsn, f"{s.application_name}:listen"[:63], self.wakeup, stop=self.stop).run()

    def workers(self, *, drain: bool = False) -> dict[str, Worker]:
        """concurrency claim loops; with drain, each ends once nothing is pending."""
        s = self.settings
        return {f"worker-{i}": ClaimLoop(f"{s.worker_name}/{i}", self, drain=drain).run for i in range(s.concurrency)}

    def running(self, *, drain: bool = False) -> dict:
        s = self.settings
        return {"mode": "drain" if drain else "daemon", **self.describe(), "concurrency": s.concurrency,
                "batch_size": s.batch_size}

    async def _watch_backlog(self) -> None:
        """Every BACKLOG_EVERY seconds: the backlog into the gauges and systemd's
        STATUS=, and a heartbeat, so an idle daemon stays healthy (a wedged event
        loop does not, and a stuck batch ages the heartbeat by itself)."""
        outbox = OutboxRepository(self.pool)
        while True:
            self.heartbeat.beat()
            stuck = self.stuck_workers()
            try:
                row = await asyncio.wait_for(outbox.backlog(), 2 * BACKLOG_EVERY)
            except Exception as exc:  # noqa: BLE001 - an outage shows in the workers' logs, /readyz and the gauges
                log.debug("cannot read the backlog", extra={"error": describe(exc)})
                status = f"backlog unknown: {describe(exc)}"
            else:
                pending, age = row["pending"], row["oldest_age_seconds"]
                self.metrics.set_backlog(pending, age)
                status = f"backlog {pending}, lag {age or 0:.1f}s"
            if stuck:
                status += f"; stuck: {', '.join(stuck)}"
            if not self.stop.is_set():
                self.notifier.status(status)
            await asyncio.sleep(BACKLOG_EVERY)  # paced: a gauge, read every few seconds, failing or not


# --- one worker -------------------------------------------------------------------------
DRAINED = "drained"  # _look's answer in drain mode once nothing is pending


class ClaimLoop:
    def __init__(self, name: str, service: OutboxService, *, drain: bool = False) -> None:
        self.name = name
        self.service = service
        self.drain = drain
        # one streak of claim outages for this worker, across its turns
        self.claiming = service.policy.outage_retry("claim", "cannot claim; retrying")

    async def run(self) -> None:
        """Until stop is set; in drain mode, also until nothing is pending."""
        svc = self.service
        while not svc.stop.is_set():
            svc.heartbeat.beat()
            try:
                found = await self.claiming.call(self._look)
            except Stopped:
                return  # stopped during an outage: nothing was claimed
            if found == DRAINED:
                return
            if found is None:
                continue
            claim, claimed = found
            await self.process(claim, claimed=claimed)
            if self.drain:  # let the other workers see at once whether anything is left
                svc.wakeup.fire()

    async def _look(self) -> tuple[Claim, tuple[int, int]] | str | None:
        """One turn: a claimed batch and when its claim started and ended (in
        time.time_ns()); or None, after waiting for a wake-up or the poll
        interval; or DRAINED."""
        svc = self.service
        ticket = svc.wakeup.ticket()
        claim_started = time.time_ns()
        claim = await svc.outbox.claim(svc.settings.batch_size)
        if claim:
            return claim, (claim_started, time.time_ns())
        timeout = svc.settings.poll_interval
        if self.drain:
            summary = await svc.outbox.pending()
            if summary.pending == 0:
                return DRAINED
            timeout = min(timeout, summary.wait_seconds or timeout)
        await wait_for_any([ticket, svc.stop], timeout)
        return None

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
        ids = [e.id for e in claim]
        try:
            # The lease renewer is the batch's child: it cannot outlive the batch, and
            # its failure cancels the batch (claims handed back) and becomes the batch's.
            async with asyncio.TaskGroup() as batch:
                renewer = batch.create_task(self._renew(ids), name=f"{self.name}/renew")
                try:
                    await self._deliver_claimed(claim, ids)
                finally:
                    renewer.cancel()
        except BaseExceptionGroup as failed:  # one error, the batch's or the renewer's: raised as itself
            error = failed.exceptions[0]
        else:
            return
        raise error  # outside the handler, so that its own cause and traceback are what a log shows

    async def _deliver_claimed(self, claim: Claim, ids: list[int]) -> None:
        svc = self.service
        targets = claim.targets  # read with the claim; an outage retry reads them again

        async def once() -> None:
            nonlocal targets
            current, targets = targets, None
            await self._once(claim, current)

        try:
            await svc.policy.retrying(self.name).call(once)
        except asyncio.CancelledError:
            # Shutdown ran out of time, or the renewer failed: hand the claims back
            # so another worker takes them now instead of after the lease.
            with suppress(Exception):
                await asyncio.wait_for(svc.outbox.release(ids), 5)
            raise
        except Stopped:
            with suppress(Exception):
                await asyncio.wait_for(svc.outbox.release(ids), 5)
            log.warning("stopped during an outage; claims released", extra={"events": len(ids)})

    async def _renew(self, ids: list[int]) -> None:
        svc = self.service
        while True:
            await asyncio.sleep(svc.settings.lease_seconds / 3)  # paced: renewed three times per lease
            try:
                await svc.outbox.renew(ids)
            except Exception as exc:  # noqa: BLE001 - a missed renewal only risks duplicate work
                log.warning("lease renewal failed", extra={"error": describe(exc)})

    async def _once(self, events: list[Event], targets: Targets | None) -> None:
        svc = self.service
        started = time.perf_counter()
        events_of: dict[UUID, list[Event]] = defaultdict(list)
        for e in events:
            events_of[e.chunk_id].append(e)
        if targets is None:
            with span("read_states", chunks=len(events_of)):
                targets = await svc.outbox.targets(list(events_of))
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
        # The first batch at INFO, once per process: a new daemon shows that it works
        # before the first `progress` line (STATS_EVERY); the rest at DEBUG.
        first, svc.first_batch_seen = not svc.first_batch_seen, True
        log.log(
            logging.INFO if first else logging.DEBUG,
            "first batch applied" if first else "batch applied",
            extra={"worker": self.name, "events": len(events), "chunks": len(events_of), "acked": acked,
                   "released": released, "failed": len(outcome.failed), **outcome.counts(),
                   "seconds": round(time.perf_counter() - started, 4)},
        )

    async def _fail(self, chunk_id: UUID, error: str, event_ids: list[int], op: str) -> None:
        s = self.service.settings
        rows = await self.service.outbox.fail(
            event_ids, error, max_attempts=s.max_attempts,
            backoff=replace(EVENTS, base=s.retry_backoff_base, cap=s.retry_backoff_max),
        )
        dead = [r for r in rows if r["status"] == "dead"]
        self.service.policy.record_failure(op, failed=len(rows) - len(dead), dead=len(dead))
        log.log(
            logging.ERROR if dead else logging.WARNING,
            "chunk parked as a dead letter" if dead else "chunk failed; will retry with backoff",
            extra={"chunk_id": str(chunk_id), "error": error,
                   "attempts": max((r["attempts"] for r in rows), default=0), "event_ids": [r["id"] for r in rows]},
        )
