"""The real `outboxd run` as systemd and Prometheus see it: sd_notify datagrams
on a real NOTIFY_SOCKET (READY=1, WATCHDOG=1, STATUS=, STOPPING=1), /healthz,
/readyz and /metrics on an ephemeral port, trace ids in the JSON logs, and no
secret in any output when PostgreSQL cannot be reached. Plus the small pure
pieces of daemon.telemetry."""
from __future__ import annotations

import re
import signal
import socket
import threading
import time

import httpx
import pytest

from daemon.errors import EXIT_UNAVAILABLE
from daemon.runtime.batch_policy import apportion
from daemon.telemetry import Metrics, extract_context, inject_headers, setup_telemetry, span, tracer
from tests.processes import (
    MODEL_LOAD_S,
    base_env,
    daemon_env,
    health_port,
    insert_backlog,
    long_texts,
    outbox_counts,
    sample,
)
from tests.support import assert_converged, open_qdrant

PASSWORD = "Telemetry5ecretPw"
API_KEY = "Telemetry5ecretKey"


# --- the daemon under systemd and Prometheus ---------------------------------------------------------
@pytest.mark.slow
async def test_systemd_notifications_health_and_metrics_of_a_real_daemon(
    spawn, notify, conn, dsn, collection, embedder, tmp_path
):
    """READY=1 after start, WATCHDOG=1 at half WATCHDOG_USEC, STATUS= with the backlog,
    /healthz and /readyz 200, /metrics counting the applied events, trace ids in the
    logs, and STOPPING=1 on SIGTERM before a clean exit."""
    texts = long_texts(12, words=20, seed=11)
    insert_backlog(conn, texts, per_document=6)
    qpath = tmp_path / "qdrant"
    env = daemon_env(
        dsn, qpath, collection,
        NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=200_000,
        OUTBOXD_HEALTH__PORT=0, OUTBOXD_HEALTH__HOST="127.0.0.1",
        OUTBOXD_BATCH_SIZE=4, OUTBOXD_LOG_LEVEL="DEBUG",
    )
    env.pop("WATCHDOG_PID", None)
    daemon = spawn("run", env=env, name="notified")
    port = health_port(daemon)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        # alive while starting (the model loads), whatever readiness says
        assert (await http.get("/healthz")).status_code == 200

        daemon.wait_for(lambda: notify.seen(lambda m: m == "READY=1"), "READY=1", MODEL_LOAD_S)
        assert notify.seen(lambda m: m == "STATUS=starting"), notify.messages
        assert notify.index("STATUS=starting") < notify.index("READY=1")
        daemon.wait_for(lambda: outbox_counts(dsn)[0] == 0, "the backlog to drain", 120, 0.1)

        status = daemon.wait_for(
            lambda: notify.seen(lambda m: re.fullmatch(r"STATUS=backlog \d+, lag \d+\.\ds", m)), "STATUS=backlog", 15
        )
        assert status
        daemon.wait_for(lambda: notify.messages.count("WATCHDOG=1") >= 3, "three WATCHDOG=1", 10)

        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {
            name: {"status": "ok"} for name in ("postgresql", "migrations", "running", "qdrant", "model")
        }

        async def metrics_text() -> str:
            r = await http.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            return r.text

        deadline = time.monotonic() + 15
        while True:  # the counters are recorded just after the acknowledgement; the gauges every few seconds
            text = await metrics_text()
            applied = sample(text, "outboxd_events_applied_total", op="upsert", result="ok")
            pending = sample(text, "outboxd_events_pending")
            if (applied == len(texts) and pending == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert applied == len(texts), text
        assert pending == 0, text
        assert sample(text, "outboxd_lag_seconds") == 0
        assert sample(text, "outboxd_embeddings_total", kind="computed") == len(texts)
        batches = sample(text, "outboxd_batch_size_count")
        assert batches >= len(texts) / 4
        assert sample(text, "outboxd_batch_size_sum") == len(texts)
        assert sample(text, "outboxd_batch_seconds_count") == batches
        assert sample(text, "outboxd_qdrant_seconds_count") == batches  # every batch wrote points
        assert sample(text, "outboxd_encode_seconds_sum") > 0
        assert sample(text, "outboxd_dead_letters_total") == 0
        assert 'service_name="outboxd"' in text  # target_info carries the resource

    batch_lines = [d for d in daemon.logs() if d.get("msg") in ("first batch applied", "batch applied")]
    assert batch_lines, daemon.describe()
    for line in batch_lines:
        assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) and re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert len({d["trace_id"] for d in batch_lines}) == len(batch_lines), "one trace per batch"
    assert "trace_id" not in daemon.log("outboxd running"), "no span outside a batch"

    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.wait(40) == 0, daemon.describe()
    daemon.wait_for(lambda: "STOPPING=1" in notify.messages, "STOPPING=1", 5)
    assert notify.index("READY=1") < notify.index("STOPPING=1")
    assert notify.messages.count("READY=1") == 1 and notify.messages.count("STOPPING=1") == 1

    client = open_qdrant(qpath)
    try:
        assert await assert_converged(dsn, client, collection, embedder) == len(texts)
    finally:
        await client.close()


@pytest.mark.slow
def test_unreachable_postgresql_fails_readiness_and_never_leaks_the_password(spawn, notify, collection, tmp_path):
    """While PostgreSQL is unreachable, /healthz stays 200 (the process is alive and
    retrying) and /readyz is 503 naming postgresql; the start-up gives up with exit 69;
    neither the password nor the API key appears in any response or in the output."""
    url = f"postgresql://outboxd:{PASSWORD}@127.0.0.1:1/outboxd?connect_timeout=2"
    env = daemon_env(
        url, tmp_path / "qdrant", collection,
        QDRANT_API_KEY=API_KEY, OUTBOXD_STARTUP_TIMEOUT=8, OUTBOXD_LOG_LEVEL="DEBUG",
        OUTBOXD_HEALTH__PORT=0, OUTBOXD_HEALTH__HOST="127.0.0.1", NOTIFY_SOCKET=notify.path,
    )
    proc = spawn("run", env=env, name="unreachable")
    port = health_port(proc)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        metrics = http.get("/metrics")
    assert ready.status_code == 503, ready.text
    checks = ready.json()["checks"]
    assert checks["postgresql"]["status"] == "fail"
    assert checks["migrations"]["status"] == "fail"  # asked through the same pool: no answer either
    assert checks["running"] == {"status": "fail", "error": "ServiceUnavailableError: starting"}
    assert metrics.status_code == 200

    assert proc.wait(60) == EXIT_UNAVAILABLE, proc.describe()
    errors = [d for d in proc.logs() if d.get("level") == "error"]
    assert errors and "PostgreSQL" in errors[-1]["msg"], proc.describe()
    assert "READY=1" not in notify.messages
    assert "STOPPING=1" in notify.messages
    for secret in (PASSWORD, API_KEY):
        for text in (ready.text, metrics.text, proc.stdout, proc.stderr, *notify.messages):
            assert secret not in text


@pytest.mark.slow
def test_health_port_in_use_is_a_configuration_error(spawn, collection, tmp_path):
    """A health port another process holds ends the start-up with exit 78 and says which port."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        taken = holder.getsockname()[1]
        env = daemon_env(
            f"postgresql://outboxd:{PASSWORD}@127.0.0.1:1/outboxd", tmp_path / "qdrant", collection,
            OUTBOXD_HEALTH__PORT=taken, OUTBOXD_HEALTH__HOST="127.0.0.1",
        )
        proc = spawn("run", env=env, name="port-taken")
        assert proc.wait(60) == 78, proc.describe()
    finally:
        holder.close()
    errors = [d for d in proc.logs() if d.get("level") == "error"]
    assert errors and f"127.0.0.1:{taken}" in errors[-1]["msg"], proc.describe()
    assert PASSWORD not in proc.stderr and PASSWORD not in proc.stdout


# --- the pure pieces ------------------------------------------------------------------------------------
def test_trace_context_travels_in_kafka_headers():
    """inject_headers carries the current span's traceparent; extract_context continues that trace."""
    setup_telemetry("outboxd")
    with span("relay.publish") as relay_span:
        headers = inject_headers()
        relay = relay_span.get_span_context()
    assert dict(headers).keys() >= {"traceparent"}
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert dict(headers)["traceparent"].decode().split("-")[1] == format(relay.trace_id, "032x")
    with tracer.start_as_current_span("consume", context=extract_context(headers)) as consumer:
        assert consumer.get_span_context().trace_id == relay.trace_id
        assert consumer.parent.span_id == relay.span_id
    with tracer.start_as_current_span("consume", context=extract_context(None)) as orphan:
        assert orphan.parent is None and orphan.get_span_context().trace_id != relay.trace_id
    with tracer.start_as_current_span("consume", context=extract_context([("traceparent", b"\xff")])) as bad:
        assert bad.parent is None


def test_setup_telemetry_is_idempotent():
    assert setup_telemetry("outboxd") is setup_telemetry("another name")


def test_metrics_without_a_meter_are_no_ops():
    """Without opentelemetry (or with OTEL_SDK_DISABLED) every instrument accepts calls and /metrics says why it is empty."""
    metrics = Metrics(None, note="OTEL_SDK_DISABLED=true")
    metrics.events_applied.add(1, {"op": "upsert", "result": "ok"})
    metrics.batch_seconds.record(0.1)
    metrics.set_backlog(3, None)
    metrics.set_consumer_lag({0: 4})
    body, content_type = metrics.render_prometheus()
    assert b"OTEL_SDK_DISABLED" in body and content_type.startswith("text/plain")


def test_consumer_lag_and_backlog_gauges():
    metrics = setup_telemetry("outboxd").metrics
    metrics.set_consumer_lag({2: 40, 0: 5})
    metrics.set_backlog(0, None)
    text = metrics.render_prometheus()[0].decode()
    assert sample(text, "outboxd_consumer_lag", partition="0") == 5
    assert sample(text, "outboxd_consumer_lag", partition="2") == 40
    assert sample(text, "outboxd_events_pending") == 0 and sample(text, "outboxd_lag_seconds") == 0


def test_a_flush_leaves_no_stale_samples_for_the_next_scrape():
    """Flushing at exit pushes OTLP only: a Prometheus collect outside a scrape would
    be served again with the next scrape, as duplicate series holding old values."""
    telemetry = setup_telemetry("outboxd")
    telemetry.metrics.set_consumer_lag({0: 1})
    telemetry.flush()
    telemetry.metrics.set_consumer_lag({0: 9})
    text = telemetry.render_prometheus()[0].decode()
    assert [line for line in text.splitlines() if line.startswith('outboxd_consumer_lag{partition="0"}')] == [
        'outboxd_consumer_lag{partition="0"} 9.0'
    ]
    assert text.count("# TYPE outboxd_consumer_lag gauge") == 1


@pytest.mark.parametrize(
    "total, weights, expected",
    [
        (10, {"upsert": 4}, {"upsert": 10}),  # one op: exact whatever the chunk count
        (0, {"upsert": 4}, {}),
        (5, {"upsert": 0, "delete": 0}, {}),
        (10, {"upsert": 1, "delete": 1}, {"upsert": 5, "delete": 5}),
        (7, {"upsert": 2, "payload": 1, "delete": 0}, {"upsert": 5, "payload": 2}),
    ],
)
def test_apportion_splits_event_counts_over_ops(total, weights, expected):
    shares = apportion(total, weights)
    assert shares == expected
    assert sum(shares.values()) == (total if any(weights.values()) else 0)



def test_otlp_export_when_the_endpoint_is_set(tmp_path):
    """With OTEL_EXPORTER_OTLP_ENDPOINT, spans and metrics are POSTed as OTLP/HTTP
    protobuf to /v1/traces and /v1/metrics of a real HTTP receiver; OTEL_SERVICE_NAME
    and OTEL_RESOURCE_ATTRIBUTES name the resource."""
    import http.server
    import subprocess
    import sys

    received: list[tuple[str, str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server interface
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = (
        "from daemon.telemetry import setup_telemetry, span\n"
        "t = setup_telemetry('outboxd')\n"
        "with span('outboxd.batch', events=1):\n"
        "    t.metrics.events_applied.add(1, {'op': 'upsert', 'result': 'ok'})\n"
        "t.flush()\n"
        "print(t.render_prometheus()[0].decode())\n"
    )
    try:
        env = base_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
            OTEL_SERVICE_NAME="outboxd-eu1",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        )
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    paths = {path for path, _, _ in received}
    assert {"/v1/traces", "/v1/metrics"} <= paths, (received, done.stderr)
    assert all(ctype == "application/x-protobuf" for _, ctype, _ in received)
    traces = b"".join(body for path, _, body in received if path == "/v1/traces")
    assert b"outboxd.batch" in traces and b"outboxd-eu1" in traces
    metrics = b"".join(body for path, _, body in received if path == "/v1/metrics")
    assert b"outboxd_events_applied" in metrics
    # the Prometheus side sees the same resource
    assert 'service_name="outboxd-eu1"' in done.stdout and 'deployment_environment="test"' in done.stdout


def test_runs_without_opentelemetry_installed():
    """Without the telemetry extra the daemon's imports work, spans and instruments
    are no-ops, logs carry no trace ids, and /metrics says why it is empty."""
    import subprocess
    import sys

    script = (
        "import sys, logging\n"
        "sys.modules['opentelemetry'] = None  # as if not installed\n"
        "import daemon.outbox.notify_daemon\n"
        "from daemon.logs import JsonFormatter\n"
        "from daemon.telemetry import setup_telemetry, span, inject_headers, extract_context\n"
        "t = setup_telemetry('outboxd')\n"
        "with span('outboxd.batch', histogram='batch_seconds', events=1) as s:\n"
        "    s.set_attributes({'acked': 1})\n"
        "    t.metrics.events_applied.add(1, {'op': 'upsert', 'result': 'ok'})\n"
        "    line = JsonFormatter().format(logging.LogRecord('x', 20, '', 0, 'inside', (), None))\n"
        "assert 'trace_id' not in line, line\n"
        "assert inject_headers() == [] and extract_context([('traceparent', b'x')]) is None\n"
        "print(t.render_prometheus()[0].decode())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=base_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "opentelemetry is not installed" in done.stdout


# --- what the worker records, in-process -------------------------------------------------------------------
def _counters(text: str) -> dict[tuple[str, str], float]:
    found = {}
    for m in re.finditer(r'^outboxd_events_applied_total\{op="(\w+)",result="(\w+)"\} ([0-9.e+-]+)$', text, re.M):
        found[(m.group(1), m.group(2))] = float(m.group(3))
    for m in re.finditer(r'^outboxd_embeddings_total\{kind="(\w+)"\} ([0-9.e+-]+)$', text, re.M):
        found[("embeddings", m.group(1))] = float(m.group(2))
    found[("dead_letters", "")] = sample(text, "outboxd_dead_letters_total") or 0.0
    return found


async def test_worker_metrics_count_each_op_and_result(conn, dsn, qdrant, embedder, make_settings):
    """Upserts (encoded once per distinct text), payload-only changes, deletes, a retried
    failure and a dead letter each land in their labelled counter."""
    import uuid

    from psycopg.types.json import Jsonb

    from tests.support import add_document, drain

    metrics = setup_telemetry("outboxd").metrics
    before = _counters(metrics.render_prometheus()[0].decode())
    tag = uuid.uuid4().hex
    doc, ids = add_document(conn, [f"alpha {tag}", f"beta {tag}", f"alpha {tag}"])
    _, (poisoned,) = add_document(conn, [f"poison {tag}"])
    conn.execute("UPDATE chunks SET metadata = %s WHERE id = %s", (Jsonb(["not", "an", "object"]), poisoned))
    settings = make_settings(max_attempts=2, batch_size=100, concurrency=1)
    await drain(settings, dsn, embedder, qdrant)
    conn.execute("UPDATE documents SET title = 'Renamed' WHERE id = %s", (doc,))  # payload only, 3 chunks
    await drain(settings, dsn, embedder, qdrant)
    conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
    await drain(settings, dsn, embedder, qdrant)

    dead = conn.execute("SELECT count(*) FROM outboxd.outbox WHERE status = 'dead'").fetchone()[0]
    assert dead == 2  # the poisoned chunk's insert and metadata update, each failed once first
    after = _counters(metrics.render_prometheus()[0].decode())
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before.keys()}
    delta = {k: v for k, v in delta.items() if v}
    assert delta == {
        ("upsert", "ok"): 3,
        ("upsert", "failed"): dead,
        ("upsert", "dead"): dead,
        ("payload", "ok"): 3,
        ("delete", "ok"): 1,
        ("embeddings", "computed"): 2,
        ("embeddings", "cache_hit"): 1,
        ("embeddings", "payload_only"): 3,
        ("dead_letters", ""): dead,
    }
