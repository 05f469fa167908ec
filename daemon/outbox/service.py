"""An outbox service: the process shell (daemon.runtime.service) around
`concurrency` claim loops, with the pool, the schema check, the LISTEN
wake-up and the backlog gauges. The notify daemon (daemon.outbox.notify_daemon)
and the Kafka relay (consumers.relay) are the two; each supplies only where a
batch goes: start_sink() and deliver().
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from uuid import UUID

from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from daemon.config import Settings
from daemon.core.batch import Outcome, Targets
from daemon.errors import OutboxdError, SchemaNotReadyError, ServiceUnavailableError, describe
from daemon.outbox.claim_loop import ClaimLoop
from daemon.outbox.listener import Listener, Wakeup
from daemon.outbox.queue import Event, Outbox
from daemon.runtime.service import READINESS_TIMEOUT, Service
from db import migrate
from db.pool import make_pool
from db.queries import fetch

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
        self._tasks: list[asyncio.Task] = []

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
        async with self.pool.connection(timeout=READINESS_TIMEOUT) as conn:
            await conn.execute("SELECT 1")

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
        await self.pool.open(wait=True, timeout=min(10.0, self.settings.startup_timeout))

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

    def on_second_signal(self) -> None:
        for t in self._tasks:
            t.cancel()

    # --- running ----------------------------------------------------------------------------
    async def run(self, *, drain: bool = False) -> int:
        """Run the claim loops until stopped (or, with drain, until nothing is pending)."""
        s = self.settings
        listener = Listener(self.dsn, f"{s.application_name}:listen"[:63], self.wakeup)
        side_tasks = [
            asyncio.create_task(listener.run(), name="listener"),
            asyncio.create_task(self.report_stats(), name="stats"),
            asyncio.create_task(self._watch_backlog(), name="backlog"),
            asyncio.create_task(self._announce_stop(), name="stopping"),
        ]
        loops = [ClaimLoop(f"{s.worker_name}/{i}", self, drain=drain) for i in range(s.concurrency)]
        workers = [asyncio.create_task(w.run(), name=f"worker-{i}") for i, w in enumerate(loops)]
        self._tasks = workers
        log.info(
            f"{self.role} running",
            extra={"mode": "drain" if drain else "daemon", **self.describe(), "concurrency": s.concurrency,
                   "batch_size": s.batch_size},
        )
        exit_code = 0
        stopper = asyncio.create_task(self.stop.wait())
        try:
            pending = set(workers)
            while pending and not self.stop.is_set():
                done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopper)
                for t in done - {stopper}:
                    exit_code = self._outcome(t) or exit_code
            if pending:  # stopping: the batches in flight get drain_timeout to finish
                done, late = await asyncio.wait(pending, timeout=s.drain_timeout)
                if late:
                    log.warning("drain timeout: releasing the batches in flight", extra={"batches": len(late)})
                for t in late:
                    t.cancel()
                await asyncio.gather(*late, return_exceptions=True)
                for t in done:
                    exit_code = self._outcome(t) or exit_code
        finally:
            stopper.cancel()
            for t in side_tasks:
                t.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            self.log_stopped()
        return exit_code

    def _outcome(self, task: asyncio.Task) -> int:
        """The exit code a finished worker asks for (0: it just ended, e.g. drained)."""
        if task.cancelled() or task.exception() is None:
            return 0
        exc = task.exception()
        self.stop.set()
        self.arm_exit_deadline()
        if isinstance(exc, OutboxdError):  # an operator-facing stop, e.g. a reindex switched models
            log.error(str(exc), extra={"exit_code": exc.exit_code})
            return exc.exit_code
        log.error("worker crashed; stopping", extra={"error": describe(exc)}, exc_info=exc)
        return 1

    async def _announce_stop(self) -> None:
        """STOPPING=1 as soon as the stop event is set (the drain begins)."""
        await self.stop.wait()
        self.notifier.stopping()
        self.notifier.status("stopping: finishing the batches in flight")

    async def _watch_backlog(self) -> None:
        """Every BACKLOG_EVERY seconds: the backlog into the gauges and systemd's
        STATUS=, and a heartbeat, so an idle daemon stays healthy (a wedged event
        loop does not, and a stuck batch ages the heartbeat by itself)."""
        while True:
            self.heartbeat.beat()
            stuck = self.stuck_workers()
            try:
                row = (await asyncio.wait_for(fetch(self.pool, "backlog"), 2 * BACKLOG_EVERY))[0]
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
            await asyncio.sleep(BACKLOG_EVERY)
