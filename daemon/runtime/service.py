"""How a long-running outboxd process lives under a supervisor (systemd,
Kubernetes): the health endpoint, systemd notifications and telemetry around
start() and run(). Shared by the outbox loops (`run`, `relay`) and the Kafka
consumers (`consume`).

READY=1 once started, WATCHDOG=1 while the heartbeat is fresh, STATUS= from
the service, STOPPING=1 when the drain begins; /healthz answers from the first
moment (the model may take a while to load), /readyz once started.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from daemon.config import Settings
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, stop_any, wait_exponential_jitter

from daemon.errors import ConfigError, ServiceUnavailableError, describe, is_transient
from daemon.runtime.health import Heartbeat, HealthServer
from daemon.runtime.systemd import SystemdNotifier
from daemon.telemetry import get_metrics

log = logging.getLogger(__name__)

READINESS_TIMEOUT = 5.0  # seconds each /readyz check may take


class Service(Protocol):
    settings: Settings
    stop: asyncio.Event
    heartbeat: Heartbeat
    notifier: SystemdNotifier
    telemetry: Any

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]: ...
    def secrets(self) -> list[str]: ...
    def stuck_workers(self) -> list[str]: ...
    def install_signals(self) -> None: ...
    def remove_signals(self) -> None: ...
    async def start(self) -> None: ...
    async def run(self, **kwargs: Any) -> int: ...
    async def close(self) -> None: ...


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_signals(stop: asyncio.Event, what: str, on_again: Callable[[], None] | None = None) -> None:
    """SIGTERM/SIGINT set `stop` (logging `what` the process now finishes); a
    second one calls on_again (e.g. cancel the work in flight) where given."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info(f"stopping: {what}", extra={"signal": signal.Signals(signum).name})
            stop.set()
        elif on_again is not None:
            on_again()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)


def remove_stop_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)


async def until_reachable(what: str, fn, *, timeout: float, stop: asyncio.Event) -> None:
    """Run fn until it stops failing with an outage, for up to `timeout` seconds
    (OUTBOXD_STARTUP_TIMEOUT) or until stop is set; then ServiceUnavailableError."""

    def log_retry(state) -> None:
        get_metrics().retries.add(1, {"stage": "startup"})
        log.warning(
            f"{what} not reachable yet; retrying",
            extra={"error": describe(state.outcome.exception()), "retry_in": round(state.upcoming_sleep, 2)},
        )

    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(multiplier=0.5, max=10.0),
            stop=stop_any(stop_after_delay(timeout), lambda _: stop.is_set()),
            before_sleep=log_retry,
            reraise=True,
        ):
            with attempt:
                await fn()
    except Exception as exc:
        if is_transient(exc):  # PoolTimeout is an OperationalError too
            raise ServiceUnavailableError(
                f"{what} stayed unreachable for {timeout:.0f}s: {describe(exc)}. "
                "Check the address and credentials, or raise OUTBOXD_STARTUP_TIMEOUT."
            ) from exc
        raise


async def run_service(service: Service, **run_kwargs: Any) -> int:
    """Start, run until stopped, close; with the health endpoint and systemd around it."""
    service.install_signals()
    started = time.perf_counter()
    starting = asyncio.create_task(_beat(service.heartbeat), name="heartbeat")
    lifecycle = [starting]
    if service.notifier.watchdog_interval:
        lifecycle.append(asyncio.create_task(_watchdog(service), name="watchdog"))
    health = None
    try:
        service.notifier.status("starting")
        health = await start_health(service)
        await service.start()
        starting.cancel()
        log.debug("started", extra={"seconds": round(time.perf_counter() - started, 3)})
        if service.stop.is_set():
            log.info("stopped during start-up; nothing was claimed")
            return 0
        service.notifier.ready()
        return await service.run(**run_kwargs)
    finally:
        service.notifier.stopping()
        for t in lifecycle:
            t.cancel()
        await asyncio.gather(*lifecycle, return_exceptions=True)
        service.remove_signals()
        if health is not None:
            await health.close()
        await service.close()
        service.notifier.close()
        service.telemetry.flush()


async def _beat(heartbeat: Heartbeat, every: float = 1.0) -> None:
    """The heartbeat while nothing else beats it (start-up: connecting, loading the model)."""
    while True:
        heartbeat.beat()
        await asyncio.sleep(every)


async def _watchdog(daemon: Service) -> None:
    """WATCHDOG=1 every watchdog_interval while the heartbeat is fresh: a wedged
    loop or a stuck worker stops the pings, and systemd restarts the service."""
    interval, timeout = daemon.notifier.watchdog_interval, daemon.settings.heartbeat_timeout
    withheld = False
    while True:
        if daemon.heartbeat.fresh(timeout):
            daemon.notifier.watchdog()
            withheld = False
        elif not withheld:
            log.error(
                "heartbeat stale: withholding the systemd watchdog ping",
                extra={"heartbeat_age": round(daemon.heartbeat.age, 1), "stuck": daemon.stuck_workers()},
            )
            withheld = True
        await asyncio.sleep(interval)


async def start_health(daemon: Service) -> HealthServer | None:
    """/healthz, /readyz and /metrics on health_host:health_port (None: off)."""
    s = daemon.settings
    if s.health_port is None:
        return None
    server = HealthServer(
        s.health_host,
        s.health_port,
        daemon.heartbeat,
        s.heartbeat_timeout,
        daemon.readiness_checks(),
        daemon.telemetry.render_prometheus,
        readiness_timeout=READINESS_TIMEOUT,
        secrets=daemon.secrets(),
    )
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot serve health checks on {s.health_host}:{s.health_port}: {exc.strerror or exc}. "
            "Set OUTBOXD_HEALTH_PORT to a free port, or unset it"
        ) from exc
    log.info("health endpoint listening", extra={"host": s.health_host, "port": server.port})
    return server
