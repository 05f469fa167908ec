"""The outbox loop's lifecycle: start the parts, run the workers, stop cleanly.

One stop event ends everything. SIGTERM/SIGINT set it: workers stop claiming,
finish the batch in flight within drain_timeout (or release it), and the
process exits 0. A second signal stops at once, releasing claims.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict

from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from daemon.core.apply import ApplyResult
from daemon.config import Settings
from daemon.errors import (
    OutboxdError,
    SchemaNotReadyError,
    ServiceUnavailableError,
    describe,
)
from daemon.runtime.health import Heartbeat
from daemon.runtime.service import READINESS_TIMEOUT, install_stop_signals, remove_stop_signals, until_reachable
from daemon.outbox.listener import Listener, Wakeup
from daemon.outbox.queue import Outbox
from daemon.runtime.systemd import SystemdNotifier
from daemon.telemetry import setup_telemetry
from daemon.outbox.claim_loop import BatchSink, Stats, Worker
from db import migrate
from db.pool import make_pool
from db.queries import fetch

log = logging.getLogger(__name__)

STATS_EVERY = 30.0
BACKLOG_EVERY = 5.0  # seconds between backlog reads (metrics, systemd STATUS, heartbeat)


class Supervisor:
    """One process's outbox loop: the pool, the schema check, the LISTEN wake-up,
    `concurrency` workers feeding a BatchSink, signals, drain and stats. The
    notify daemon (daemon.outbox.notify_daemon.Daemon) and the Kafka relay (consumers.relay.Relay) differ only in
    the sink they start: start_sink() returns it with the Qdrant collection it
    writes (None: acknowledgements skip the catalog check)."""

    role = "outboxd"
    service_name = "outboxd"  # the OpenTelemetry service.name unless OTEL_SERVICE_NAME says otherwise
    # the op label of every event the workers finish (the relay: "published");
    # None: by what the sink did to the chunk (upsert, payload, delete, unchanged)
    events_op: str | None = None

    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.stop = asyncio.Event()
        self.wakeup = Wakeup()
        self.stats = Stats()
        self.pool: AsyncConnectionPool | None = None
        self.sink: BatchSink | None = None
        self.outbox: Outbox | None = None
        self._workers: list[asyncio.Task] = []
        self._worker_loops: list[Worker] = []
        self.telemetry = setup_telemetry(self.service_name)
        self.metrics = self.telemetry.metrics
        self.heartbeat = Heartbeat()
        self.notifier = SystemdNotifier()

    # --- what differs between transports ---------------------------------------
    async def start_sink(self) -> tuple[BatchSink, str | None]:
        raise NotImplementedError

    async def close_sink(self) -> None:
        """Close what start_sink opened."""

    def describe(self) -> dict:
        """What the 'running' log line says about the sink."""
        return {}

    def stats_extra(self) -> dict:
        return {}

    def observe_batch(self, result: ApplyResult) -> None:
        """Called after each applied batch, for the sink's own metrics."""

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """/readyz: each check raises when this process cannot do its work. A
        subclass adds its sink's (super().readiness_checks() | {...})."""
        return {
            "postgresql": self._ready_postgresql,
            "migrations": self._ready_migrations,
            "running": self._ready_running,
        }

    async def _ready_postgresql(self) -> None:
        if self.pool is None:
            raise ServiceUnavailableError("not connected yet")
        async with self.pool.connection(timeout=READINESS_TIMEOUT) as conn:
            await conn.execute("SELECT 1")

    async def _ready_migrations(self) -> None:
        current = await asyncio.to_thread(migrate.current_revision, self.dsn)
        head = migrate.head_revision()
        if current != head:
            raise SchemaNotReadyError(f"schema at revision {current or 'none'}, this outboxd needs {head}")

    async def _ready_running(self) -> None:
        if self.stop.is_set():
            raise ServiceUnavailableError("stopping")
        if self.outbox is None:
            raise ServiceUnavailableError("starting")

    def secrets(self) -> list[str]:
        """Values no health response may contain, whatever an error message says."""
        found = []
        with suppress(Exception):
            found.append(conninfo_to_dict(self.dsn).get("password"))
        for secret in (self.settings.database_url, self.settings.qdrant_api_key, self.settings.kafka_sasl_password):
            if secret is not None:
                found.append(secret.get_secret_value())
        return [s for s in found if s]

    # --- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Connect, check the schema, start the sink. Unreachable services are
        waited for up to startup_timeout."""
        s = self.settings
        self.pool = make_pool(
            self.dsn, application_name=s.application_name, min_size=s.pool_min_size, max_size=s.pool_max_size
        )
        await self._until_reachable("PostgreSQL", self._open_pool)
        await self._check_schema()
        self.sink, collection = await self.start_sink()
        self.outbox = Outbox(self.pool, s.worker_name, s.lease_seconds, collection=collection)

    async def _open_pool(self) -> None:
        await self.pool.open(wait=True, timeout=min(10.0, self.settings.startup_timeout))

    async def _until_reachable(self, what: str, fn) -> None:
        await until_reachable(what, fn, timeout=self.settings.startup_timeout, stop=self.stop)

    async def _check_schema(self) -> None:
        current = await asyncio.to_thread(migrate.current_revision, self.dsn)
        head = migrate.head_revision()
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
                await self.pool.close()

    # --- running ----------------------------------------------------------------
    def install_signals(self) -> None:
        """SIGTERM/SIGINT set the stop event (also during start-up, which then
        ends as soon as it can); a second one cancels the workers at once."""

        def now() -> None:
            log.warning("second signal: stopping now, claims released")
            for t in self._workers:
                t.cancel()

        install_stop_signals(self.stop, "finishing the batches in flight", now)

    def remove_signals(self) -> None:
        remove_stop_signals()

    async def run(self, *, drain: bool = False) -> int:
        """Run the workers until stopped (or, with drain, until nothing is pending)."""
        s = self.settings
        listener = Listener(self.dsn, f"{s.application_name}:listen"[:63], self.wakeup)
        side_tasks = [
            asyncio.create_task(listener.run(), name="listener"),
            asyncio.create_task(self._report_stats(), name="stats"),
            asyncio.create_task(self._watch_backlog(), name="backlog"),
            asyncio.create_task(self._announce_stop(), name="stopping"),
        ]
        self._worker_loops = [
            Worker(
                f"{s.worker_name}/{i}",
                s,
                self.outbox,
                self.sink,
                self.wakeup,
                self.stop,
                self.stats,
                drain=drain,
                metrics=self.metrics,
                heartbeat=self.heartbeat,
                events_op=self.events_op,
                on_batch=self.observe_batch,
            )
            for i in range(s.concurrency)
        ]
        workers = [asyncio.create_task(w.run(), name=f"worker-{i}") for i, w in enumerate(self._worker_loops)]
        self._workers = workers
        log.info(
            f"{self.role} running",
            extra={
                "mode": "drain" if drain else "daemon",
                **self.describe(),
                "concurrency": s.concurrency,
                "batch_size": s.batch_size,
            },
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
                for t in late:
                    log.warning("drain timeout: releasing the batch in flight")
                    t.cancel()
                await asyncio.gather(*late, return_exceptions=True)
                for t in done:
                    exit_code = self._outcome(t) or exit_code
        finally:
            stopper.cancel()
            for t in side_tasks:
                t.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            self._log_stats(f"{self.role} stopped")
        return exit_code

    def _outcome(self, task: asyncio.Task) -> int:
        """The exit code a finished worker asks for (0: it just ended, e.g. drained)."""
        if task.cancelled() or task.exception() is None:
            return 0
        exc = task.exception()
        self.stop.set()
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

    def stuck_workers(self) -> list[str]:
        """Workers whose batch has made no progress for heartbeat_timeout."""
        return self.heartbeat.stuck(self.settings.heartbeat_timeout)

    async def _watch_backlog(self) -> None:
        """Every BACKLOG_EVERY seconds: the backlog into the gauges and systemd's
        STATUS=, and a heartbeat, so an idle daemon stays healthy (a wedged event
        loop does not, and a stuck batch ages the heartbeat by itself)."""
        while True:
            self.heartbeat.beat()
            stuck = self.stuck_workers()
            try:
                row = (await asyncio.wait_for(fetch(self.pool, "backlog"), 2 * BACKLOG_EVERY))[0]
            except Exception as exc:  # noqa: BLE001 - an outage shows in the workers' logs and /readyz
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

    async def _report_stats(self) -> None:
        last = None
        while True:
            await asyncio.sleep(STATS_EVERY)
            now = asdict(self.stats)
            if now != last:
                self._log_stats("progress")
                last = now

    def _log_stats(self, message: str) -> None:
        log.info(message, extra={**asdict(self.stats), **self.stats_extra()})
