"""The health endpoint over real HTTP on an ephemeral port: liveness by
heartbeat age, readiness by named checks, Prometheus metrics, 404."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from daemon.runtime.health import HealthServer, Heartbeat
from daemon.telemetry import setup_telemetry
from tests.clock import ManualClock

SECRET = "Hunter2Secret"


async def ok() -> None:
    return None


async def refused() -> None:
    raise ConnectionRefusedError(f"connection to postgresql://app:{SECRET}@db:5432 refused")


async def hangs() -> None:
    await asyncio.sleep(60)


@pytest.fixture
async def serve():
    servers: list[HealthServer] = []

    async def start(readiness=None, *, heartbeat=None, timeout=10.0, **kw) -> tuple[HealthServer, httpx.AsyncClient]:
        telemetry = setup_telemetry("outboxd-test")
        server = HealthServer(
            "127.0.0.1", 0, heartbeat or Heartbeat(), timeout, readiness or {}, telemetry.render_prometheus, **kw
        )
        await server.start()
        servers.append(server)
        assert server.port > 0
        return server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10)

    yield start
    for server in servers:
        await server.close()


async def test_healthz_follows_the_heartbeat_age(serve):
    """200 while the heartbeat is younger than the timeout, 503 once it is older, 200 again after a beat."""
    clock = ManualClock()
    heartbeat = Heartbeat(clock)
    _, client = await serve(heartbeat=heartbeat, timeout=0.5)
    async with client:
        clock.advance(0.4)
        r = await client.get("/healthz")
        assert r.status_code == 200
        assert r.json()["status"] == "ok"
        clock.advance(4.6)  # the loop stopped beating five seconds ago
        r = await client.get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "fail" and body["heartbeat_age_seconds"] == 5.0
        assert body["heartbeat_timeout_seconds"] == 0.5
        heartbeat.beat()
        assert (await client.get("/healthz")).status_code == 200


async def test_readyz_200_when_every_check_passes(serve):
    _, client = await serve({"postgresql": ok, "qdrant": ok})
    async with client:
        r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"status": "ok", "checks": {"postgresql": {"status": "ok"}, "qdrant": {"status": "ok"}}}


async def test_readyz_503_names_the_failing_check_without_secrets(serve):
    """A failing check makes 503 and is named with its error; a known secret in the error is redacted."""
    _, client = await serve({"postgresql": refused, "qdrant": ok}, secrets=[SECRET])
    async with client:
        r = await client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "fail"
    assert body["checks"]["qdrant"] == {"status": "ok"}
    assert body["checks"]["postgresql"]["status"] == "fail"
    assert body["checks"]["postgresql"]["error"].startswith("ConnectionRefusedError: ")
    assert SECRET not in r.text


async def test_readyz_fails_a_check_that_never_answers(serve):
    """A check that never answers fails after readiness_timeout; the others still answer."""
    _, client = await serve({"a": hangs, "b": hangs, "c": ok}, readiness_timeout=0.3)
    async with client:
        r = await client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["a"] == checks["b"] == {"status": "fail", "error": "no answer within 0.3s"}
    assert checks["c"] == {"status": "ok"}


async def test_readyz_runs_the_checks_side_by_side(serve):
    """Each check answers only once the other has started: run one after the
    other, the first would wait out its timeout and fail."""
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    def meets(me: str, other: str):
        async def check() -> None:
            started[me].set()
            await started[other].wait()
        return check

    _, client = await serve({"a": meets("a", "b"), "b": meets("b", "a")}, readiness_timeout=8)
    async with client:
        r = await client.get("/readyz")
    assert r.json() == {"status": "ok", "checks": {"a": {"status": "ok"}, "b": {"status": "ok"}}}


async def test_metrics_serve_prometheus_text(serve):
    """/metrics renders the outboxd_ instruments in the Prometheus text format."""
    telemetry = setup_telemetry("outboxd-test")
    telemetry.metrics.events_applied.add(3, {"op": "upsert", "result": "ok"})
    telemetry.metrics.set_backlog(7, 1.25)
    _, client = await serve()
    async with client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "# TYPE outboxd_events_applied_total counter" in text
    assert 'outboxd_events_applied_total{op="upsert",result="ok"}' in text
    assert "outboxd_events_pending 7.0" in text
    assert "outboxd_lag_seconds 1.25" in text
    assert "# HELP outboxd_dead_letters_total" in text


async def test_unknown_path_is_404_and_other_methods_405(serve):
    _, client = await serve()
    async with client:
        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/")).status_code == 404
        assert (await client.post("/healthz")).status_code == 405
        head = await client.head("/healthz?verbose=1")
        assert head.status_code == 200 and head.content == b""


async def test_garbage_gets_400_and_the_server_lives_on(serve):
    server, client = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"hello there\r\n\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response.startswith(b"HTTP/1.1 400 ")
    async with client:
        assert (await client.get("/healthz")).status_code == 200


async def test_port_is_the_ephemeral_one_and_close_stops_listening(serve):
    server, client = await serve()
    port = server.port
    await server.close()
    with pytest.raises(httpx.ConnectError):
        async with client:
            await client.get("/healthz")
    assert port > 0



async def test_a_stuck_batch_ages_the_heartbeat_however_often_the_loop_beats(serve):
    """Work marked busy() and not finished makes /healthz fail after the timeout even
    while the loop keeps beating; progress (busy() again) or idle() heals it."""
    clock = ManualClock()
    heartbeat = Heartbeat(clock)
    _, client = await serve(heartbeat=heartbeat, timeout=0.3)
    heartbeat.busy("w/0")
    clock.advance(5)  # worker 0's batch has hung for five seconds
    heartbeat.busy("w/1")
    heartbeat.beat()
    async with client:
        r = await client.get("/healthz")
        assert r.status_code == 503
        assert r.json()["stuck"] == ["w/0"]
        assert heartbeat.stuck(0.3) == ["w/0"]
        heartbeat.busy("w/0")  # an outage retry: progress
        assert (await client.get("/healthz")).status_code == 200
        clock.advance(5)
        heartbeat.beat()
        heartbeat.idle("w/0")
        heartbeat.idle("w/1")
        r = await client.get("/healthz")
        assert r.status_code == 200 and "stuck" not in r.json()


def test_waiting_for_a_budget_is_progress_of_every_batch_in_flight():
    """A request waiting its turn of the embedding budget calls progress(): the
    batches in flight are not stuck, however long the budget makes them wait."""
    clock = ManualClock()
    heartbeat = Heartbeat(clock)
    heartbeat.busy("w/0")
    heartbeat.busy("w/1")
    clock.advance(5)
    heartbeat.beat()
    assert heartbeat.stuck(0.3) == ["w/0", "w/1"]
    heartbeat.progress()
    assert heartbeat.stuck(0.3) == [] and heartbeat.fresh(0.3)
