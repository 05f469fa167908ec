"""Metrics and traces: OpenTelemetry, scraped by Prometheus or pushed by OTLP.

setup_telemetry() (once per process) builds a MeterProvider whose
PrometheusMetricReader feeds GET /metrics on the health port, and, only where
OTEL_EXPORTER_OTLP_ENDPOINT (or its _METRICS_/_TRACES_ variant) is set, OTLP
over HTTP for metrics and traces. The standard variables are honoured:
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the resource),
OTEL_SDK_DISABLED (everything off), OTEL_METRICS_EXPORTER / OTEL_TRACES_EXPORTER
=none (no OTLP for that signal), OTEL_TRACES_SAMPLER, OTEL_METRIC_EXPORT_INTERVAL,
OTEL_EXPORTER_OTLP_HEADERS and the rest that the exporters read themselves.

Everything here is optional: without the `telemetry` extra (opentelemetry-sdk,
the Prometheus and OTLP exporters) the instruments and spans are no-ops, a line
is logged once, and the daemon runs as before.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

log = logging.getLogger(__name__)

try:  # the API alone makes spans and instruments no-ops; the SDK makes them real
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import propagate, trace
    from opentelemetry.metrics import Observation

    HAVE_API = True
except ImportError:  # pragma: no cover - exercised only without the telemetry extra
    HAVE_API = False

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# name -> (kind, unit, description); the README's metrics table lists the same
INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    "events_pending": (
        "gauge", "{event}", "Outbox events waiting to be applied (dead letters aside), as of the last backlog read.",
    ),
    "lag_seconds": ("gauge", "s", "Age of the oldest pending outbox event (0 when none is pending)."),
    "events_applied": (
        "counter", "{event}",
        "Outbox events a batch finished, by what was done to their chunk (op: upsert, payload, delete, "
        "unchanged, published; older = a Kafka event older than its point, skipped) and what became of the "
        "event (result: ok = acknowledged, released = handed back because the chunk changed meanwhile, "
        "failed = will be retried, dead = parked as a dead letter).",
    ),
    "embeddings": (
        "counter", "{chunk}",
        "Chunks by how their vector was obtained (kind: computed = texts the model encoded, cache_hit = "
        "from the in-memory cache or the same batch, reused = found in Qdrant, payload_only = payload set "
        "without embedding, unchanged = nothing to do).",
    ),
    "batch_size": ("histogram", "{event}", "Events per claimed batch."),
    "batch_seconds": ("histogram", "s", "Seconds from claiming a batch to acknowledging it, retries included."),
    "encode_seconds": ("histogram", "s", "Seconds the model spent encoding, per batch."),
    "qdrant_seconds": ("histogram", "s", "Seconds per confirmed Qdrant batch write (upserts, payloads, deletes)."),
    "retries": (
        "counter", "{retry}",
        "Retries after an outage of PostgreSQL, Qdrant or Kafka (stage: startup, claim, batch); "
        "they do not count against the events.",
    ),
    "dead_letters": ("counter", "{event}", "Events parked as dead letters after max_attempts failures."),
    "relay_published": ("counter", "{event}", "Chunk events the Kafka relay published (confirmed by the brokers)."),
    "consumer_applied": ("counter", "{message}", "Kafka messages the consumer group applied to Qdrant."),
    "consumer_lag": (
        "gauge", "{message}", "Messages the consumer group has yet to read, by partition (high watermark - position).",
    ),
    "ready": ("gauge", "1", "1 while this process's readiness checks pass (/readyz), else 0."),
    "dependency_up": (
        "gauge", "1",
        "1 while the dependency answered its last check, 0 while it is unreachable "
        "(dependency: postgresql, qdrant, kafka, embedding).",
    ),
    "dependency_wait_seconds": (
        "counter", "s",
        "Seconds spent waiting for an unreachable dependency (label dependency), during start-up and while running.",
    ),
    "verify_chunks_checked": ("counter", "{chunk}", "Chunks the continuous verifier checked against their points."),
    "verify_drift": (
        "counter", "{chunk}",
        "Drift the continuous verifier found and confirmed, by kind (missing, orphaned, stale, wrong_model, missing_sparse, wrong_sparse).",
    ),
    "verify_repaired": ("counter", "{event}", "Repair events the continuous verifier enqueued."),
    "verify_holder": ("gauge", "1", "1 in the daemon that holds the verifier's lease (verifies now), else 0."),
    "verify_position": (
        "gauge", "1", "How far the current verification pass is, 0 to 1 (the share of the chunk id space passed).",
    ),
    "verify_pass_started_timestamp_seconds": (
        "gauge", "s", "Unix time the current verification pass started (the previous one ended then).",
    ),
    "verify_last_pass_timestamp_seconds": ("gauge", "s", "Unix time the last full verification pass completed."),
    "verify_expected_pass_seconds": (
        "gauge", "s", "Seconds a full verification pass should take at this daemon's rate (its chunks ÷ rate).",
    ),
    "embedding_budget_wait_seconds": (
        "counter", "s",
        "Seconds requests to the embedding endpoint waited for their turn of its budget (reason: budget = the "
        "requests or tokens per minute, retry_after = a 429's Retry-After; scope: database = shared by the "
        "daemons of one database, process = this process's own). Neither an attempt nor an outage.",
    ),
}
PREFIX = "outboxd_"


class _NoopInstrument:
    def add(self, amount: float, attributes: dict | None = None) -> None:
        pass

    def record(self, amount: float, attributes: dict | None = None) -> None:
        pass


class Metrics:
    """The process's named instruments. Counters and histograms are recorded
    directly (metrics.events_applied.add(n, {"op": ..., "result": ...})); the
    gauges report what set_backlog / set_consumer_lag / set_ready / set_dependency_up
    last stored."""

    def __init__(self, meter: Any = None, registry: Any = None, *, note: str | None = None) -> None:
        self._registry = registry
        self._note = note  # why /metrics is empty, when it is
        self._backlog: tuple[int, float] | None = None
        self._consumer_lag: dict[int, int] = {}
        self._ready: bool | None = None
        self._dependency_up: dict[str, bool] = {}
        self._verify: dict[str, float] = {}  # verify gauge name -> value (absent: not known)
        for name, (kind, unit, description) in INSTRUMENTS.items():
            setattr(self, name, self._make(meter, name, kind, unit, description))
        self.dead_letters.add(0)  # a series from the start, so increase() sees the first one

    def _make(self, meter: Any, name: str, kind: str, unit: str, description: str) -> Any:
        if meter is None:
            return _NoopInstrument()
        full = PREFIX + name
        if kind == "counter":
            return meter.create_counter(full, unit=unit, description=description)
        if kind == "histogram":
            buckets = SECONDS_BUCKETS if unit == "s" else SIZE_BUCKETS
            return meter.create_histogram(
                full, unit=unit, description=description, explicit_bucket_boundaries_advisory=list(buckets)
            )
        callbacks = {
            "events_pending": self._observe_pending,
            "lag_seconds": self._observe_lag,
            "consumer_lag": self._observe_consumer_lag,
            "ready": self._observe_ready,
            "dependency_up": self._observe_dependency_up,
        }
        callback = callbacks[name] if name in callbacks else self._observe_verify(name)
        return meter.create_observable_gauge(full, callbacks=[callback], unit=unit, description=description)

    # --- gauges --------------------------------------------------------------------------------
    def set_backlog(self, pending: int, oldest_age_seconds: float | None) -> None:
        self._backlog = (int(pending), max(0.0, float(oldest_age_seconds or 0.0)) if pending else 0.0)

    def set_consumer_lag(self, lag: dict[int, int]) -> None:
        self._consumer_lag = {int(p): int(n) for p, n in lag.items()}

    def set_ready(self, ready: bool) -> None:
        self._ready = bool(ready)

    def set_dependency_up(self, name: str, up: bool) -> None:
        self._dependency_up[str(name)] = bool(up)

    def set_verify(self, **values: float | None) -> None:
        """The verifier's gauges (holder, position, pass_started_timestamp_seconds,
        last_pass_timestamp_seconds, expected_pass_seconds); None: not known."""
        for key, value in values.items():
            if value is None:
                self._verify.pop(key, None)
            else:
                self._verify[key] = float(value)

    def _observe_verify(self, name: str):
        if not name.startswith("verify_"):
            raise KeyError(f"gauge {name!r} has no callback")
        key = name.removeprefix("verify_")

        def observe(_options) -> list:
            value = self._verify.get(key)
            return [] if value is None else [Observation(value)]

        return observe

    def _observe_pending(self, _options) -> list:
        return [] if self._backlog is None else [Observation(self._backlog[0])]

    def _observe_lag(self, _options) -> list:
        return [] if self._backlog is None else [Observation(self._backlog[1])]

    def _observe_consumer_lag(self, _options) -> list:
        return [Observation(n, {"partition": str(p)}) for p, n in sorted(self._consumer_lag.items())]

    def _observe_ready(self, _options) -> list:
        return [] if self._ready is None else [Observation(int(self._ready))]

    def _observe_dependency_up(self, _options) -> list:
        return [Observation(int(up), {"dependency": name}) for name, up in sorted(self._dependency_up.items())]

    # --- Prometheus ----------------------------------------------------------------------------
    def render_prometheus(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition of every instrument."""
        if self._registry is None:
            return f"# outboxd: no metrics: {self._note or 'telemetry is off'}\n".encode(), PROMETHEUS_CONTENT_TYPE
        from prometheus_client import generate_latest

        return generate_latest(self._registry), PROMETHEUS_CONTENT_TYPE


class Telemetry:
    """What setup_telemetry built: the metrics, and what pushes them (OTLP) to flush."""

    def __init__(
        self, metrics: Metrics, push_readers: list[Any] | None = None, tracer_provider: Any = None
    ) -> None:
        self.metrics = metrics
        self.push_readers = push_readers or []
        self.tracer_provider = tracer_provider

    def render_prometheus(self) -> tuple[bytes, str]:
        return self.metrics.render_prometheus()

    def flush(self, timeout_seconds: float = 5.0) -> None:
        """Push what the OTLP exporters hold (at exit; a no-op without them). Only the
        push readers: a collect by the Prometheus reader outside a scrape is queued
        and served again with the next scrape's, as stale duplicate samples."""
        for flushable in (self.tracer_provider, *self.push_readers):
            if flushable is not None:
                try:
                    flushable.force_flush(int(timeout_seconds * 1000))
                except Exception as exc:  # noqa: BLE001 - telemetry never stops the daemon
                    log.debug("telemetry flush failed", extra={"error": f"{type(exc).__name__}: {exc}"})


_lock = threading.Lock()
_telemetry: Telemetry | None = None
_noop_metrics = Metrics(None)


def get_metrics() -> Metrics:
    """The process's Metrics: setup_telemetry's, or no-op instruments before it."""
    return _telemetry.metrics if _telemetry is not None else _noop_metrics


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _otlp_wanted(signal: str) -> bool:
    """OTLP for this signal ('METRICS' or 'TRACES'): an endpoint is set and
    OTEL_<signal>_EXPORTER does not say none."""
    endpoint = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporters = os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").lower()
    return bool(endpoint) and "none" not in {e.strip() for e in exporters.split(",")}


def _resource(service_name: str):
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    try:
        resource = Resource({"service.version": version("outboxd")}).merge(resource)
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        pass
    return resource


def setup_telemetry(service_name: str = "outboxd") -> Telemetry:
    """Build the providers once per process; later calls return the same Telemetry."""
    global _telemetry
    with _lock:
        if _telemetry is None:
            try:
                _telemetry = _build(service_name)
            except Exception as exc:  # noqa: BLE001 - a bad OTEL_* value never stops the daemon
                log.warning("telemetry off: cannot set it up", extra={"error": f"{type(exc).__name__}: {exc}"})
                _telemetry = Telemetry(Metrics(None, note=f"set-up failed: {type(exc).__name__}"))
        return _telemetry


def _build(service_name: str) -> Telemetry:
    if _env_true("OTEL_SDK_DISABLED"):
        log.info("telemetry off: OTEL_SDK_DISABLED=true")
        return Telemetry(Metrics(None, note="OTEL_SDK_DISABLED=true"))
    if not HAVE_API:
        log.info("telemetry off: opentelemetry is not installed (pip install 'outboxd[telemetry]')")
        return Telemetry(Metrics(None, note="opentelemetry is not installed"))
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        log.info("telemetry off: opentelemetry-sdk is not installed (pip install 'outboxd[telemetry]')")
        return Telemetry(Metrics(None, note="opentelemetry-sdk is not installed"))

    resource = _resource(service_name)
    readers: list[Any] = []
    push_readers: list[Any] = []  # OTLP: what flush() pushes at exit
    registry = None
    note = None
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)  # ours alone: no stray default collectors
        readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
    except ImportError:
        note = "opentelemetry-exporter-prometheus is not installed"
        log.info(f"/metrics is empty: {note} (pip install 'outboxd[telemetry]')")

    span_exporter = None
    if _otlp_wanted("METRICS") or _otlp_wanted("TRACES"):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        if protocol != "http/protobuf":
            log.warning("OTLP: only http/protobuf is supported; using it", extra={"protocol": protocol})
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            if _otlp_wanted("METRICS"):
                push_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
                readers.append(push_readers[-1])
            if _otlp_wanted("TRACES"):
                span_exporter = OTLPSpanExporter()
            log.info("OTLP export on", extra={"metrics": _otlp_wanted("METRICS"), "traces": _otlp_wanted("TRACES")})
        except ImportError:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp-proto-http is not "
                "installed; not exporting (pip install 'outboxd[telemetry]')"
            )

    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    otel_metrics.set_meter_provider(meter_provider)
    tracer_provider = TracerProvider(resource=resource)
    if span_exporter is not None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    # Spans exist (and logs carry their ids) without an exporter too.
    trace.set_tracer_provider(tracer_provider)
    metrics = Metrics(meter_provider.get_meter("outboxd"), registry, note=note)
    return Telemetry(metrics, push_readers, tracer_provider)


# --- tracing -------------------------------------------------------------------------------------
class _NoopSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict) -> None:
        pass

    def record_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass

    def is_recording(self) -> bool:
        return False


class _NoopTracer:
    @contextmanager
    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> Iterator[_NoopSpan]:
        yield _NoopSpan()

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> _NoopSpan:
        return _NoopSpan()


# A proxy until setup_telemetry installs the SDK's provider; then real spans.
tracer: Any = trace.get_tracer("outboxd") if HAVE_API else _NoopTracer()


@contextmanager
def span(name: str, *, histogram: str | None = None, start_time: int | None = None, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one; with histogram, also record its seconds
    in that instrument of get_metrics() (e.g. "qdrant_seconds")."""
    started = time.perf_counter()
    try:
        with tracer.start_as_current_span(name, start_time=start_time, attributes=attributes or None) as s:
            yield s
    finally:
        if histogram is not None:
            getattr(get_metrics(), histogram).record(time.perf_counter() - started)


def record_span(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child span of the current one, from times taken before it
    was known to be wanted (the claim that turned out to start a batch)."""
    tracer.start_span(name, start_time=start_ns, attributes=attributes or None).end(end_time=end_ns)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, if one is recording."""
    if not HAVE_API:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def inject_headers() -> list[tuple[str, bytes]]:
    """The current span's W3C trace context (traceparent, tracestate) as Kafka
    message headers, so a consumer's span continues the relay's trace."""
    if not HAVE_API:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode()) for k, v in carrier.items()]


def extract_context(headers: list[tuple[str, bytes]] | None) -> Any:
    """The Context a consumer starts its span in (tracer.start_as_current_span(
    name, context=...)): the relay's trace where the message carries one, else a
    fresh root. None without opentelemetry."""
    if not HAVE_API:
        return None
    carrier = {}
    for key, value in headers or ():
        try:
            carrier[key.lower()] = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
        except UnicodeDecodeError:
            continue
    return propagate.extract(carrier, context=otel_context.Context())
