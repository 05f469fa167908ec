"""Real services for the tests: PostgreSQL (DATABASE_URL, else a throwaway
pgserver), Qdrant (QDRANT_URL, else local mode) and the real MiniLM model."""
from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.embedding.embedder import Embedder
from db import migrate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QDRANT_TEST_IMAGE = "qdrant/qdrant:v1.19.0"


def pytest_configure(config):
    """OUTBOXD_TEST_QDRANT=container: run the whole suite against a Qdrant server in
    Docker (testcontainers). It is set up as QDRANT_URL before any test starts, so
    fixtures and the daemons the tests spawn all use it, as with your own server."""
    if os.environ.get("OUTBOXD_TEST_QDRANT") != "container" or os.environ.get("QDRANT_URL"):
        return
    from testcontainers.community.qdrant import QdrantContainer

    image = os.environ.get("OUTBOXD_TEST_QDRANT_IMAGE", QDRANT_TEST_IMAGE)
    try:
        container = QdrantContainer(image).start()
    except Exception as exc:  # no Docker engine: say so instead of a page of docker-py traceback
        raise pytest.UsageError(
            f"OUTBOXD_TEST_QDRANT=container needs a Docker engine to start {image}: {exc}; "
            "unset it to use local mode, or set QDRANT_URL to a Qdrant server"
        ) from exc
    config.stash[_qdrant_container] = container
    os.environ["QDRANT_URL"] = f"http://{container.rest_host_address}"
    os.environ["OUTBOXD_QDRANT_GRPC_PORT"] = str(container.exposed_grpc_port)


def pytest_unconfigure(config):
    container = config.stash.get(_qdrant_container, None)
    if container is not None:
        container.stop()


_qdrant_container = pytest.StashKey()


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
    pgdata = Path(tempfile.mkdtemp(prefix="outboxd-test-pg-"))
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
    from db.pool import make_pool

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
    from db.pool import make_pool

    p = make_pool(dsn, application_name="outboxd:test", min_size=1, max_size=4)
    await p.open(wait=True)
    yield p
    await p.close()


@pytest.fixture
def collection() -> str:
    return f"chunks_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def qdrant(collection):
    """QDRANT_URL when set, else qdrant-client's local mode in memory."""
    url = os.environ.get("QDRANT_URL")
    client = AsyncQdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY")) if url else AsyncQdrantClient(location=":memory:")
    yield client
    if url:  # a shared server: remove the alias and the physical collections behind it
        for c in (await client.get_collections()).collections:
            if c.name.startswith(collection):
                await client.delete_collection(c.name)
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
        if not os.environ.get("QDRANT_URL") and "qdrant_url" not in overrides:
            values["qdrant_path"] = tmp_path / "qdrant"  # local mode, unless the suite runs against a server
        values.update(overrides)
        return Settings(**values)

    return make


REPO = Path(__file__).resolve().parents[1]


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
