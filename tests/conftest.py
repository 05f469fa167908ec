"""Real services for the tests: PostgreSQL (DATABASE_URL, else a throwaway
pgserver), Qdrant (QDRANT_URL, else a real server from its binary, else a
container, else local mode: tests/qdrant_server.py) and the real MiniLM model."""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from db import migrate
from tests.folders import server_folder, session_prefixes

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC C core logs INFO lines on every fork

# --- which tests need services ------------------------------------------------------------
SERVICE_FIXTURES = {"pg_server", "template_db", "dsn", "empty_dsn", "conn", "pool", "make_outbox", "qdrant",
                    "embedder", "reference", "make_settings", "spawn", "kafka_bootstrap", "kafka_broker", "_kafka"}


def pytest_collection_modifyitems(config, items):
    """Every test under tests/integration and tests/benchmarks needs real services:
    marked `integration` here, in one place, so `-m "not integration"` starts none.
    A test elsewhere that asks for a service fixture is a mistake: it fails by name."""
    integration, benchmarks = REPO / "tests" / "integration", REPO / "tests" / "benchmarks"
    misplaced = []
    for item in items:
        where = Path(str(item.path)).parents
        if integration in where or benchmarks in where:
            item.add_marker(pytest.mark.integration)
        elif used := SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            misplaced.append(f"{item.nodeid} asks for {', '.join(sorted(used))}")
    if misplaced:
        raise pytest.UsageError("tests outside tests/integration need services; move them there: "
                                + "; ".join(misplaced))


# --- Qdrant: one for the session (tests/qdrant_server.py says which) --------------------
_qdrant_session = pytest.StashKey()
_qdrant_server = pytest.StashKey()


def pytest_collection_finish(session):
    """Choose the session's Qdrant once the tests are known, and start it where it
    is a server this run starts: only when some test outside tests/unit runs.
    It is published as QDRANT_URL (and OUTBOXD_QDRANT__GRPC_PORT) before any test
    starts, so fixtures and the outboxd processes tests spawn all use it."""
    config = session.config
    if config.option.collectonly or _qdrant_session in config.stash:
        return
    unit = REPO / "tests" / "unit"
    if not any(unit not in Path(str(item.path)).parents for item in session.items):
        return
    config.stash[_qdrant_session] = _start_session_qdrant(config)


def _start_session_qdrant(config) -> str:
    """Set the environment for the session's Qdrant; a label that says which it is."""
    from tests.qdrant_server import BINARY_VARIABLE, CHOICE_VARIABLE, CONTAINER_IMAGE, QdrantServer, find_binary

    if os.environ.get("QDRANT_URL"):
        return f"your Qdrant at QDRANT_URL={os.environ['QDRANT_URL']}"
    choice = os.environ.get(CHOICE_VARIABLE, "auto")
    if choice not in ("auto", "server", "container", "local"):
        raise pytest.UsageError(f"{CHOICE_VARIABLE}={choice!r}: expected server, container or local (or unset)")
    if choice in ("auto", "server"):
        try:
            binary = find_binary()
        except FileNotFoundError as exc:
            raise pytest.UsageError(str(exc)) from exc
        if binary is not None:
            server = QdrantServer(binary).start()
            config.stash[_qdrant_server] = server  # stopped at the session's end (pytest_sessionfinish)
            config.add_cleanup(server.close)  # and here too, should the session end before it began
            os.environ["QDRANT_URL"] = server.url
            os.environ["OUTBOXD_QDRANT__GRPC_PORT"] = str(server.grpc_port)
            return f"a real {server.describe()}"
        if choice == "server":
            raise pytest.UsageError(
                f"{CHOICE_VARIABLE}=server, but no Qdrant server binary was found: set {BINARY_VARIABLE}, "
                "or put `qdrant` on PATH"
            )
    if choice == "container" or (choice == "auto" and _docker_reachable()):
        from testcontainers.community.qdrant import QdrantContainer

        image = os.environ.get("OUTBOXD_TEST_QDRANT_IMAGE", CONTAINER_IMAGE)
        try:
            container = QdrantContainer(image).start()
        except Exception as exc:  # no Docker engine: say so instead of a page of docker-py traceback
            raise pytest.UsageError(
                f"{CHOICE_VARIABLE}=container needs a Docker engine to start {image}: {exc}; "
                "unset it, or set QDRANT_URL to a Qdrant server"
            ) from exc
        config.add_cleanup(container.stop)
        os.environ["QDRANT_URL"] = f"http://{container.rest_host_address}"
        os.environ["OUTBOXD_QDRANT__GRPC_PORT"] = str(container.exposed_grpc_port)
        return f"a Qdrant server in a container ({image}) at {os.environ['QDRANT_URL']}"
    why = "chosen" if choice == "local" else f"no Qdrant server binary ({BINARY_VARIABLE}) and no Docker engine"
    return f"qdrant-client local mode ({why})"


# --- nothing a test started outlives the session -----------------------------------------
_leaks = pytest.StashKey()


def pytest_sessionstart(session):
    session.config.stash[_leaks] = ([], time.time())


def pytest_sessionfinish(session, exitstatus):
    """Once every fixture is torn down: a PostgreSQL or Qdrant server of a folder this
    session made (tests/folders.py), still running, is a leak (a fixture or the
    harness did not stop it). It is reported, stopped, and fails the run. Another
    session's servers, running beside this one, are none of its business."""
    found, started = session.config.stash[_leaks]
    server = session.config.stash.get(_qdrant_server, None)
    if server is not None:
        server.close()
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] not in ("postgres", "qdrant") or proc.info["create_time"] < started:
            continue
        if any(folder in cmdline for folder in session_prefixes()) and (
                proc.info["name"] == "qdrant" or " -D " in cmdline):
            found.append(f"{proc.info['name']} {proc.pid}: {cmdline[:160]}")
            with contextlib.suppress(psutil.Error):
                proc.kill()
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found, _ = config.stash.get(_leaks, ([], 0))
    for line in found:
        terminalreporter.write_line(f"LEAKED SERVER (stopped now): {line}", red=True)
    label = config.stash.get(_qdrant_session, None)
    if label is None:
        return
    terminalreporter.write_line(f"Qdrant: {label}")
    summary = os.environ.get("OUTBOXD_TEST_SUMMARY")
    if summary:  # .ci/run puts it in its own last line
        Path(summary).write_text(label + "\n")


def dsn_for(base_dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(base_dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


def _admin(base_dsn: str) -> psycopg.Connection:
    return psycopg.connect(base_dsn, autocommit=True)


def create_database(base_dsn: str, name: str, template: str | None = None) -> str:
    with _admin(base_dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return dsn_for(base_dsn, name)


def drop_database(base_dsn: str, name: str) -> None:
    with _admin(base_dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> str:
    """DSN of a server the tests may create databases on: DATABASE_URL, else a
    throwaway pgserver PostgreSQL, else (no pgserver wheel) testcontainers."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    try:
        import pgserver
    except ImportError:  # pgserver has no wheel for this platform: a container, where Docker runs
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16") as pg:
            yield pg.get_connection_url(driver=None)
        return

    # Not under pytest's tmp_path: a concurrent pytest run prunes old numbered
    # folders there, which would pull the data directory from under the server.
    pgdata = server_folder("test-pg")
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_server) -> str:
    name = f"outboxd_tpl_{os.getpid()}"
    migrate.upgrade(create_database(pg_server, name))
    yield name
    drop_database(pg_server, name)


@pytest.fixture
def empty_dsn(pg_server):
    """A new database with nothing in it (for migration tests)."""
    name = f"outboxd_empty_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_server, name)
    drop_database(pg_server, name)


@pytest.fixture
def dsn(pg_server, template_db):
    """A new database migrated to head."""
    name = f"outboxd_t_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_server, name, template=template_db)
    drop_database(pg_server, name)


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
async def make_outbox(dsn):
    """Outbox(worker, lease) on its own pool, as a separate daemon would have."""
    from daemon.outbox.queue import Outbox
    from db.gateway import make_pool

    pools = []

    async def make(worker: str, lease_seconds: float = 30.0, *, application_name: str | None = None) -> Outbox:
        pool = make_pool(dsn, application_name=application_name or f"outboxd:{worker}", min_size=1, max_size=3)
        await pool.open(wait=True)
        pools.append(pool)
        return Outbox(pool, worker, lease_seconds)

    yield make
    for pool in pools:
        await pool.close()


@pytest.fixture
async def pool(dsn):
    """An open pool on the test database, for the parts that take one."""
    from db.gateway import make_pool

    p = make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=4)
    await p.open(wait=True)
    yield p
    await p.close()


@pytest.fixture
def collection():
    """A collection (alias) name of this test's own. On a server, every
    collection whose name starts with it is deleted afterwards, whoever made it
    (the test, or an outboxd process it started)."""
    name = f"chunks_{uuid.uuid4().hex[:8]}"
    yield name
    if os.environ.get("QDRANT_URL"):
        from tests.support import delete_collections

        delete_collections(name)


@pytest.fixture
async def qdrant(collection):
    """A client of the session's Qdrant: its server, else local mode in memory."""
    from tests.support import open_qdrant

    client = open_qdrant(":memory:")
    yield client
    await client.close()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real all-MiniLM-L6-v2 through the daemon's default backend (the torch
    encode stage), loaded once per session."""
    emb = Embedder(Settings(database_url=None))
    asyncio.run(emb.load())
    yield emb
    asyncio.run(emb.close())


@pytest.fixture(scope="session")
def reference():
    """sentence-transformers' own SentenceTransformer for the same model, loaded
    once per session: the truth the daemon's vectors are checked against
    (`reference.encode(texts, normalize_embeddings=True)`)."""
    from daemon.config import DEFAULT_MODEL
    from daemon.embedding.torch_backend import reference_model

    return reference_model(DEFAULT_MODEL)


@pytest.fixture
def make_settings(dsn, collection, tmp_path):
    """Settings for an in-process test; given kafka={...}, the Kafka wing's (StreamSettings)."""

    def make(**overrides) -> Settings:
        values = dict(
            database_url=dsn,
            collection=collection,
            data_dir=tmp_path / "data",
            poll_interval=0.5,
            lease_seconds=5,
            retry_backoff_base=0.05,
            retry_backoff_max=0.2,
            drain_timeout=10,
            startup_timeout=10,
            log_format="text",
        )
        qdrant = dict(overrides.pop("qdrant", None) or {})
        if not os.environ.get("QDRANT_URL") and "url" not in qdrant:
            qdrant.setdefault("path", tmp_path / "qdrant")  # local mode, unless the suite runs against a server
        values.update(overrides, qdrant=qdrant)
        if "kafka" in values:
            from consumers.settings import StreamSettings

            return StreamSettings(**values)
        return Settings(**values)

    return make


# --- Kafka -------------------------------------------------------------------------------


def _docker_reachable() -> bool:
    """A Docker engine answers (cheap: no socket and no DOCKER_HOST means no)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def _kafka():
    """(bootstrap, KafkaBroker or None): KAFKA_BOOTSTRAP_SERVERS, else a
    testcontainers Kafka where a Docker engine answers, else a real Apache Kafka
    broker from ops/kafka/kafka.sh (Java 17+, jars from Maven Central). A broker
    that cannot start fails the tests with kafka.sh's error text; nothing skips."""
    url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if url:
        yield url, None
        return
    if _docker_reachable():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server(), None
        return

    from tests.kafka_broker import KafkaBroker

    # Its data dir comes from tempfile.mkdtemp(), not pytest's tmp_path: a
    # concurrent pytest run prunes old numbered folders there, which would pull
    # the data from under the broker. Removed at the end (kept if it failed to start).
    with KafkaBroker() as broker:
        yield broker.bootstrap, broker


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka) -> str:
    """host:port[,host:port] of a Kafka broker for the whole session."""
    return _kafka[0]


@pytest.fixture(scope="session")
def kafka_broker(_kafka):
    """The session's tests.kafka_broker.KafkaBroker (restart()/stop()/start()),
    or None when the broker is external (KAFKA_BOOTSTRAP_SERVERS) or a container:
    a test that restarts the broker skips then."""
    return _kafka[1]


# --- outboxd as a child process ---------------------------------------------------------
@pytest.fixture
def spawn(tmp_path):
    """Start outboxd processes (cwd = tmp_path unless given); all are killed at teardown."""
    from tests.processes import DaemonProcess

    started: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str], cwd: Path | None = None, name: str | None = None) -> DaemonProcess:
        proc = DaemonProcess(list(args), env, cwd or tmp_path, name or f"outboxd-{len(started)}")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def notify():
    """A NOTIFY_SOCKET the test reads, as systemd would (tests.processes.NotifyListener)."""
    from tests.processes import NotifyListener

    listener = NotifyListener()
    yield listener
    listener.close()
