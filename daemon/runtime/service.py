"""The shell every long-running outboxd process runs in (`run`, `relay`,
`consume`, `tail`): one stop event and the signals that set it, start-up
waiting, the batch policy, stats, secrets, health, systemd and telemetry.

A transport subclasses Service and supplies start(), workers() (what one
worker does: a claim loop, the poll loop) and close(); the lifecycle here does
the rest, for workers and side tasks alike: start them, watch them, drain them
with a deadline, cancel them, release what start() opened (run_service):

READY=1 once started, WATCHDOG=1 while the heartbeat is fresh, STATUS= from
the service, STOPPING=1 when the drain begins; /healthz answers from the
first moment (the model may take a while to load), /readyz once started; the
`outboxd_ready` and `outboxd_dependency_up` gauges follow the readiness checks
every few seconds, so an outage shows on a graph even while no batch runs.

SIGTERM/SIGINT set the stop event: the work in flight gets drain_timeout to
finish, and the process is gone a few seconds later whatever is still running
(a forward pass, a pool, an exporter): a shutdown deadline ends it. A second
signal stops at once: the work in flight is cancelled, and the process exits
130 (interrupted) within SECOND_SIGNAL_GRACE.

One supervisor: every worker (run()) and every side task (readiness gauges,
watchdog, stats, and the transport's own: the LISTEN wake-up, the backlog
gauges, the verifier) is a task started and watched here (watch()), and no
task is created anywhere else (the layout test holds every other module to
that, with a short, explained allow-list). Whatever fails first, a worker or
a side task, goes through fail(): its exit code is recorded before the stop
begins, so neither the drain nor the shutdown deadline can end the process
with 0. On stop the workers get drain_timeout to finish their current batch,
then are cancelled (a claim loop hands its claims back); the side tasks are
cancelled once the workers are done.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import replace
from typing import Any, TypeVar

from daemon.config import Settings
from daemon.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    ConfigError,
    OutboxdError,
    ServiceUnavailableError,
    describe,
)
from daemon.runtime.backoff import STARTUP
from daemon.runtime.batch_policy import BatchPolicy, Stats
from daemon.runtime.health import HealthServer, Heartbeat, run_check
from daemon.runtime.retry import Failed, GaveUp, Retry
from daemon.runtime.systemd import SystemdNotifier
from daemon.telemetry import setup_telemetry
from db.embedded import release_embedded_postgres

log = logging.getLogger(__name__)

READINESS_TIMEOUT = 5.0  # seconds each /readyz check may take
READINESS_EVERY = 5.0  # seconds between readiness evaluations for the gauges
STATS_EVERY = 30.0  # seconds between `progress` log lines (when something changed)
SHUTDOWN_GRACE = 5.0  # seconds after drain_timeout before the process is ended regardless
SECOND_SIGNAL_GRACE = 3.0  # seconds a second SIGINT/SIGTERM leaves to release the claims in flight and close
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# readiness check -> the dependency its gauge reports
DEPENDENCY_OF_CHECK = {"postgresql": "postgresql", "qdrant": "qdrant", "kafka": "kafka", "model": "embedding"}

T = TypeVar("T")
Check = Callable[[], Awaitable[None]]
SideTask = Callable[[], Awaitable[None]]
Worker = Callable[[], Awaitable[None]]  # one worker's loop: a claim loop, a poll loop


def exit_code_of(exc: BaseException) -> int:
    """The exit code a failure stops the process with (daemon.errors: the contract)."""
    if isinstance(exc, OutboxdError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


class Service:
    role = "outboxd"
    service_name = "outboxd"  # OpenTelemetry service.name unless OTEL_SERVICE_NAME says otherwise

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.telemetry = setup_telemetry(self.service_name)
        self.metrics = self.telemetry.metrics
        self.heartbeat = Heartbeat()
        self.notifier = SystemdNotifier()
        self.stats = Stats()
        self.policy = BatchPolicy(self.stop, self.metrics, self.stats, self.heartbeat)
        self.started = False  # set by start() once it has done its work (readiness: "running")
        self.exit_code = 0  # what the process exits with if the shutdown deadline has to end it
        self.exit_deadline = False  # run_service(exit_deadline=True): the CLI's processes
        self._workers: list[asyncio.Task] = []  # run()'s, for a second signal to cancel
        self._deadline: threading.Timer | None = None
        self._deadline_due = 0.0  # time.monotonic() when the armed deadline ends the process
        self._cpu_at_start = time.process_time()

    # --- what a transport supplies --------------------------------------------------
    async def start(self) -> None:
        raise NotImplementedError

    def workers(self, **kwargs: Any) -> dict[str, Worker]:
        """The work, by name: what each worker does (one loop), given run()'s
        arguments. run() starts and watches them; a worker may end (its work is
        done: a drain found nothing left), one that fails stops the service."""
        raise NotImplementedError

    def running(self, **kwargs: Any) -> dict[str, Any]:
        """What the `running` log line says, given run()'s arguments."""
        return {}

    async def close(self) -> None:
        """Close what start() opened; must not raise."""

    def readiness_checks(self) -> dict[str, Check]:
        """/readyz: each check raises when this process cannot do its work. A
        subclass adds its own (super().readiness_checks() | {...})."""
        return {"running": self._ready_running}

    def stats_extra(self) -> dict[str, Any]:
        return {}

    def side_tasks(self) -> dict[str, SideTask]:
        """Long-running helpers, started once start() is done and watched like the
        work: one that fails or ends on its own stops the service (fail()). A
        subclass adds its own (super().side_tasks() | {...})."""
        return {"stats": self.report_stats, "stopping": self._announce_stop}

    def on_second_signal(self) -> None:
        """A second SIGTERM/SIGINT: stop now, the work in flight cancelled (a claim
        loop hands its claims back, a consumer's batch stays uncommitted)."""
        for task in self._workers:
            task.cancel()

    # --- provided ------------------------------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> int:
        """Stop because `where` failed: its exit code first (the first failure's
        wins; a deadline that fires later exits with it), then the stop."""
        code = exit_code_of(exc)
        if not self.exit_code:
            self.exit_code = code
        if isinstance(exc, OutboxdError):  # an operator-facing stop, e.g. a refused key, a reindex switched models
            log.error(str(exc), extra={"exit_code": code, "where": where})
        else:
            log.error(f"{where} crashed; stopping", extra={"error": describe(exc), "exit_code": code},
                      exc_info=exc)
        self.stop.set()
        self.arm_exit_deadline()
        return code

    def watch(self, name: str, job: SideTask | Worker, *, worker: bool = False) -> asyncio.Task:
        """Start a task and watch it: if it fails the service stops (fail(), its exit
        code). A worker may end, its work done; a side task that ends while the
        service is not stopping is a failure too."""
        task = asyncio.create_task(job(), name=name)
        where = f"worker {name}" if worker else f"side task {name!r}"

        def ended(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None:
                if worker or self.stop.is_set():
                    return
                exc = RuntimeError(f"the {name} task ended on its own")
            self.fail(exc, where)

        task.add_done_callback(ended)
        return task

    async def run(self, **kwargs: Any) -> int:
        """The work: the workers (workers(**kwargs)), started and watched until all
        have ended or the stop is set; then those still busy get drain_timeout to
        finish their current batch and are cancelled. None outlives it, even when
        it is cancelled itself. The exit code: the first failure's, else 0."""
        jobs = self.workers(**kwargs)
        log.info(f"{self.role} running", extra=self.running(**kwargs))
        tasks = [self.watch(name, job, worker=True) for name, job in jobs.items()]
        self._workers = tasks
        try:
            pending = await self._until_done_or_stopped(tasks)
            if pending:  # stopping: the batches in flight get drain_timeout to finish
                _, late = await asyncio.wait(pending, timeout=self.settings.drain_timeout)
                if late:
                    log.warning("drain timeout: releasing the batches in flight", extra={"batches": len(late)})
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.log_stopped()
        return self.exit_code

    async def _until_done_or_stopped(self, tasks: list[asyncio.Task]) -> set[asyncio.Task]:
        """Until every task has ended or the stop is set; the tasks still running."""
        pending = set(tasks)
        stopping = asyncio.create_task(self.stop.wait(), name="stop")
        try:
            while pending and not self.stop.is_set():
                _, pending = await asyncio.wait(pending | {stopping}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopping)
        finally:
            stopping.cancel()
        return pending

    async def _announce_stop(self) -> None:
        """STOPPING=1 as soon as the stop event is set (the drain begins)."""
        await self.stop.wait()
        self.notifier.stopping()
        self.notifier.status("stopping: finishing the batches in flight")

    async def _ready_running(self) -> None:
        if self.stop.is_set():
            raise ServiceUnavailableError("stopping")
        if not self.started:
            raise ServiceUnavailableError("starting")

    def secret_values(self) -> list[str]:
        """Values no log line or health response may contain: every secret setting,
        plus what a subclass adds (a password inside a DSN)."""
        return self.settings.secret_values() + [v for v in self.extra_secrets() if v]

    def extra_secrets(self) -> list[str]:
        return []

    def stuck_workers(self) -> list[str]:
        return self.heartbeat.stuck(self.settings.health.heartbeat_timeout)

    async def until_reachable(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """fn's result, run until it stops failing with an outage, for up to
        startup_timeout seconds or until stop is set; then ServiceUnavailableError
        (exit 69). A refusal (a key, a certificate) is its ConfigError at once (exit 78)."""

        def log_retry(failed: Failed) -> None:
            self.policy.note_outage("startup", failed.error, failed.delay)
            log.warning(
                f"{what} not reachable yet; retrying",
                extra={"error": describe(failed.error), "retry_in": round(failed.delay, 2)},
            )

        timeout = self.settings.startup_timeout
        retry = Retry(replace(STARTUP, deadline=timeout), stop=self.stop, on_retry=log_retry)
        try:
            return await retry.call(fn)
        except GaveUp as exc:  # the deadline, or a stop during the wait
            raise ServiceUnavailableError(
                f"{what} stayed unreachable for {timeout:.0f}s: {describe(exc.last)}. "
                "Check the address and credentials, or raise OUTBOXD_STARTUP_TIMEOUT."
            ) from exc.last

    def log_stats(self, message: str, **extra: Any) -> None:
        log.info(message, extra={**self.stats.as_dict(), **self.stats_extra(), **extra})

    def log_stopped(self) -> None:
        """The last stats line, with the CPU the process spent since it started running."""
        self.log_stats(f"{self.role} stopped", cpu_seconds=round(time.process_time() - self._cpu_at_start, 3))

    async def report_stats(self) -> None:
        """A `progress` line every STATS_EVERY seconds while something changes."""
        last = None
        while True:
            await asyncio.sleep(STATS_EVERY)  # paced: a log line, not a retry
            now = (self.stats.as_dict(), self.stats_extra())
            if now != last:
                self.log_stats("progress")
                last = now

    def arm_exit_deadline(self, limit: float | None = None) -> None:
        """Once stopping, the process has drain_timeout + SHUTDOWN_GRACE seconds
        (or limit, where sooner) to exit; then a thread ends it, needing neither
        the event loop nor the work in flight to cooperate (a forward pass, an
        exporter's retries, a hung close, interpreter exit waiting on a thread).
        Only where run_service(exit_deadline=True) asked for it: never in a test process."""
        if not self.exit_deadline:
            return
        limit = self.settings.drain_timeout + SHUTDOWN_GRACE if limit is None else limit
        due = time.monotonic() + limit
        if self._deadline is not None:
            if due >= self._deadline_due:
                return
            self._deadline.cancel()  # a second signal: sooner
        self._deadline_due = due

        def end() -> None:
            alive = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
            log.error("shutdown took longer than allowed (the drain timeout, or a second signal); exiting now",
                      extra={"seconds": limit, "threads": alive})
            release_embedded_postgres()  # os._exit runs no atexit hook: pgserver's would have stopped it
            with suppress(Exception):
                logging.shutdown()
                sys.stderr.flush()
            os._exit(self.exit_code)

        self._deadline = threading.Timer(limit, end)
        self._deadline.daemon = True
        self._deadline.name = "outboxd-shutdown-deadline"
        self._deadline.start()

    # --- signals -------------------------------------------------------------------
    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if not self.stop.is_set():
                again = "Ctrl-C" if signum == signal.SIGINT else name
                log.info(f"stopping: finishing the work in flight (a second {again} stops at once)",
                         extra={"signal": name})
                self.stop.set()
                self.arm_exit_deadline()
            else:
                # interrupted: the work in flight is cancelled (its claims released), the
                # process exits 130 within SECOND_SIGNAL_GRACE whatever still runs
                if not self.exit_code:
                    self.exit_code = EXIT_INTERRUPTED
                log.warning("second signal: stopping now", extra={"signal": name, "exit_code": self.exit_code})
                self.arm_exit_deadline(SECOND_SIGNAL_GRACE)
                self.on_second_signal()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)

    def remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


# --- the lifecycle -------------------------------------------------------------------
async def run_service(service: Service, *, exit_deadline: bool = False, side_tasks: dict[str, SideTask] | None = None,
                      **run_kwargs: Any) -> int:
    """Start, run until stopped, close; with health, systemd, the gauges and the
    service's side tasks around it, all watched. exit_deadline (the CLI's
    processes, not an embedding application or a test): once stopping, end the
    process after drain_timeout + SHUTDOWN_GRACE whatever is still running,
    interpreter exit included. side_tasks: an embedding application's own,
    watched beside the service's (one that is done sets the stop first)."""
    service.install_signals()
    started = time.perf_counter()
    beating = service.watch("heartbeat", lambda: _beat(service.heartbeat))
    side: list[asyncio.Task] = []
    service.exit_deadline = exit_deadline
    service.metrics.set_ready(False)
    if service.notifier.watchdog_interval:
        side.append(service.watch("watchdog", lambda: _watchdog(service)))
    health = None
    try:
        service.notifier.status("starting")
        health = await start_health(service)
        await service.start()
        beating.cancel()
        tasks = {"readiness": lambda: _readiness_gauges(service), **service.side_tasks(), **(side_tasks or {})}
        side += [service.watch(name, task) for name, task in tasks.items()]
        log.debug("started", extra={"seconds": round(time.perf_counter() - started, 3)})
        if service.stop.is_set():
            log.info("stopped during start-up; nothing was claimed")
            return service.exit_code
        service.notifier.ready()
        service._cpu_at_start = time.process_time()  # the work's CPU, not the start-up's (model loading)
        if exit_deadline:
            # What start() loaded (the model, the libraries) lives as long as the process:
            # keep it out of every later full collection, which would walk it each time.
            gc.collect()
            gc.freeze()
        code = await service.run(**run_kwargs)
        if not service.exit_code:
            service.exit_code = code
        return service.exit_code
    except BaseException as exc:
        # recorded before the finally below arms the deadline: a crash never ends the process with 0
        if not service.exit_code and not isinstance(exc, asyncio.CancelledError):
            service.exit_code = exit_code_of(exc)
        raise
    finally:
        service.stop.set()
        service.arm_exit_deadline()  # on every way out: a crash, an error at start
        service.notifier.stopping()
        for t in [beating, *side]:
            t.cancel()
        await asyncio.gather(beating, *side, return_exceptions=True)
        service.remove_signals()
        if health is not None:
            await health.close()
        await service.close()
        service.notifier.close()
        service.telemetry.flush(timeout_seconds=2.0)


async def _beat(heartbeat: Heartbeat, every: float = 1.0) -> None:
    """The heartbeat while nothing else beats it (start-up: connecting, loading the model)."""
    while True:
        heartbeat.beat()
        await asyncio.sleep(every)  # paced: a beat a second, until start() is done


async def _readiness_gauges(service: Service) -> None:
    """outboxd_ready and outboxd_dependency_up{dependency}, from the readiness
    checks every READINESS_EVERY seconds."""
    checks = service.readiness_checks()
    while True:
        errors = await asyncio.gather(*(run_check(check, READINESS_TIMEOUT) for check in checks.values()))
        results = [error is None for error in errors]
        outcome = dict(zip(checks, results))
        service.metrics.set_ready(all(results))
        for name, ok in outcome.items():
            if name in DEPENDENCY_OF_CHECK:
                service.metrics.set_dependency_up(DEPENDENCY_OF_CHECK[name], ok)
        await asyncio.sleep(READINESS_EVERY)  # paced: gauges, evaluated every few seconds, failing or not


async def _watchdog(service: Service) -> None:
    """WATCHDOG=1 every watchdog_interval while the heartbeat is fresh: a wedged
    loop or a stuck worker stops the pings, and systemd restarts the service."""
    interval, timeout = service.notifier.watchdog_interval, service.settings.health.heartbeat_timeout
    withheld = False
    while True:
        if service.heartbeat.fresh(timeout):
            service.notifier.watchdog()
            withheld = False
        elif not withheld:
            log.error(
                "heartbeat stale: withholding the systemd watchdog ping",
                extra={"heartbeat_age": round(service.heartbeat.age, 1), "stuck": service.stuck_workers()},
            )
            withheld = True
        await asyncio.sleep(interval)  # paced: systemd's watchdog interval


async def start_health(service: Service) -> HealthServer | None:
    """/healthz, /readyz and /metrics on [health] host:port (port None: off)."""
    s = service.settings.health
    if s.port is None:
        return None
    server = HealthServer(
        s.host,
        s.port,
        service.heartbeat,
        s.heartbeat_timeout,
        service.readiness_checks(),
        service.telemetry.render_prometheus,
        readiness_timeout=READINESS_TIMEOUT,
        secrets=service.secret_values(),
    )
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot serve health checks on {s.host}:{s.port}: {exc.strerror or exc}. "
            "Set OUTBOXD_HEALTH__PORT to a free port, or unset it"
        ) from exc
    log.info("health endpoint listening", extra={"host": s.host, "port": server.port})
    return server
