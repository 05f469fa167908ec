"""The services every figure runs against, set up once per harness run.

- PostgreSQL: DATABASE_URL if set, else a throwaway pgserver; one fresh
  migrated database per measurement, cloned from a template.
- Qdrant (QdrantTarget): QDRANT_URL if set (with QDRANT_API_KEY and
  OUTBOXD_QDRANT__PREFER_GRPC), else a real Qdrant server started here from its
  binary (tests/qdrant_server.py), else qdrant-client's local mode in memory.
  Clients are made the way the daemon makes them (daemon.core.qdrant_connect).
  Local mode is also measured as a labelled second row of a few figures. On a
  server every collection this run makes is named with a unique prefix and
  deleted at the end. Each figure records `target.label`, the Qdrant it measured.
- Figures of several processes need a server: local mode admits one process.
- A free embedding backend (RandomBackend): random unit vectors through the
  normal Embedder(settings, backend=...) seam, with the real model's
  fingerprint where asked, so outboxd's pipeline runs with encoding made free.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from qdrant_client import AsyncQdrantClient

from daemon.config import Settings
from daemon.core.qdrant_connect import make_client
from daemon.embedding.backend import Backend, BackendInfo, Encoded
from daemon.embedding.embedder import Embedder
from daemon.outbox.notify_daemon import NotifyDaemon
from db import migrate
from tests.folders import server_folder
from tests.qdrant_cluster import QdrantCluster
from tests.qdrant_server import QdrantServer, find_binary

LOCAL_LABEL = "qdrant-client local mode, in memory"
NO_QDRANT = "none (no Qdrant involved)"
NEEDS_SERVER = "not measured: several processes need a Qdrant server (local mode admits one process)"


def cpu_of(processes: list[psutil.Process]) -> float:
    """CPU seconds (user + system) of these processes, and of the children they reaped."""
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


# --- PostgreSQL ------------------------------------------------------------------
class Postgres:
    """DATABASE_URL if set, else a throwaway pgserver; one fresh migrated
    database per measurement, cloned from a template."""

    def __init__(self) -> None:
        self._server = None
        url = os.environ.get("DATABASE_URL")
        if url:
            self.base = url
        else:
            import pgserver

            self._server = pgserver.get_server(server_folder("bench-pg"), cleanup_mode="delete")
            self.base = self._server.get_uri()
        self.template = f"outboxd_bench_tpl_{os.getpid()}"
        migrate.upgrade(self._create(self.template))
        self._made: list[str] = [self.template]

    def _dsn(self, name: str) -> str:
        params = conninfo_to_dict(self.base)
        params["dbname"] = name
        return make_conninfo(**params)

    def _create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self._dsn(name)

    def fresh(self) -> str:
        name = f"outboxd_bench_{uuid.uuid4().hex[:10]}"
        self._made.append(name)
        return self._create(name, self.template)

    def cpu_seconds(self) -> float | None:
        """The server's CPU so far (the postmaster, its live backends, the ones it reaped);
        None where the server is not this run's own (DATABASE_URL)."""
        if self._server is None:
            return None
        data = str(Path(self._server.pgdata).resolve())
        procs = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "postgres"
                 and (data in " ".join(p.info["cmdline"] or []) or _is_backend_of(p, data))]
        return cpu_of(procs)

    def close(self) -> None:
        with psycopg.connect(self.base, autocommit=True) as conn:
            for name in reversed(self._made):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self._server is not None:
            self._server.cleanup()


def _is_backend_of(proc: psutil.Process, data: str) -> bool:
    try:
        parent = proc.parent()
        return parent is not None and data in " ".join(parent.cmdline())
    except psutil.Error:
        return False


# --- Qdrant ------------------------------------------------------------------------
class QdrantTarget:
    """One Qdrant for the figures: a server (url), or local mode in memory (url None).
    `server`: the QdrantServer this run started, whose CPU the figures can read."""

    def __init__(self, url: str | None = None, api_key: str | None = None, prefer_grpc: bool = False,
                 grpc_port: int = 6334, server: QdrantServer | None = None, ca_file: str | None = None,
                 cluster: QdrantCluster | None = None, shape: dict | None = None) -> None:
        self.url = url
        self.api_key = api_key
        self.prefer_grpc = prefer_grpc
        self.grpc_port = grpc_port
        self.server = server
        self.ca_file = ca_file
        self.cluster = cluster  # the cluster this run started, reached through its first node (url)
        self.shape = shape or {}  # [qdrant] settings of the collections outboxd creates here
        self.prefix = f"outboxd_bench_{uuid.uuid4().hex[:8]}"
        self._names = 0

    @classmethod
    def from_env(cls, stack: ExitStack) -> "QdrantTarget":
        """QDRANT_URL (with its key, gRPC and CA settings), else a server started
        from its binary for this run (stopped with `stack`), else local mode."""
        s = Settings(database_url=None)
        q = s.qdrant
        if q.url:
            key = q.api_key.get_secret_value() if q.api_key else None
            return cls(q.url, key, q.prefer_grpc, q.grpc_port, ca_file=str(q.ca_file) if q.ca_file else None)
        binary = find_binary()
        if binary is None:
            return cls.local()
        server = stack.enter_context(QdrantServer(binary))
        return cls(server.url, None, s.qdrant.prefer_grpc, server.grpc_port, server=server)

    @classmethod
    def on_cluster(cls, stack: ExitStack, binary: Path, prefer_grpc: bool = False, **shape) -> QdrantTarget:
        """A 3-node cluster of the binary started for this run (stopped with `stack`),
        reached through its first node as a client reaches one address; `shape`:
        the [qdrant] settings of the collections outboxd creates on it."""
        cluster = stack.enter_context(QdrantCluster(binary))
        first = cluster.nodes[0]
        return cls(first.url, None, prefer_grpc, first.grpc_port, cluster=cluster, shape=shape)

    @classmethod
    def local(cls) -> "QdrantTarget":
        return cls()

    @property
    def is_local(self) -> bool:
        return self.url is None

    @property
    def is_server(self) -> bool:
        return self.url is not None

    @property
    def label(self) -> str:
        if self.url is None:
            return LOCAL_LABEL
        what = f"Qdrant server {self.server.version}" if self.server else "Qdrant server"
        if self.cluster:
            what = f"{len(self.cluster)}-node Qdrant {self.cluster.nodes[0].version} cluster, through its first node,"
        shape = "".join(f", {k}={v}" for k, v in self.shape.items())
        return f"{what} at {self.url} ({'gRPC' if self.prefer_grpc else 'REST'}{shape})"

    def client(self, *, prefer_grpc: bool | None = None) -> AsyncQdrantClient:
        """A new client, made as the daemon makes its own: a new empty in-memory
        engine in local mode, else the server."""
        if self.url is None:
            return AsyncQdrantClient(location=":memory:")
        settings = Settings(database_url=None, log_level="WARNING", **self.settings())
        if prefer_grpc is not None:
            qdrant = settings.qdrant.model_copy(update={"prefer_grpc": prefer_grpc})
            settings = settings.model_copy(update={"qdrant": qdrant})
        return make_client(settings)

    def name(self, what: str) -> str:
        """A collection (alias) name unique to this run and call."""
        self._names += 1
        return f"{self.prefix}_{self._names}_{what}"[:120]

    def settings(self) -> dict:
        """Settings keywords that make a daemon talk to this Qdrant as deployed."""
        if self.url is None:
            return {"qdrant": {"url": None, "path": ":memory:"}}
        return {"qdrant": {"url": self.url, "api_key": self.api_key, "prefer_grpc": self.prefer_grpc,
                           "grpc_port": self.grpc_port, "ca_file": self.ca_file, **self.shape}}

    def env(self) -> dict[str, str]:
        """Environment for an `outboxd` process (a server only: local mode admits one process)."""
        assert self.url is not None, "local mode admits one process"
        env = {"QDRANT_URL": self.url, "OUTBOXD_QDRANT__PREFER_GRPC": "true" if self.prefer_grpc else "false",
               "OUTBOXD_QDRANT__GRPC_PORT": str(self.grpc_port)}
        if self.api_key:
            env["QDRANT_API_KEY"] = self.api_key
        if self.ca_file:
            env["OUTBOXD_QDRANT__CA_FILE"] = self.ca_file
        env.update({f"OUTBOXD_QDRANT__{k.upper()}": str(v) for k, v in self.shape.items()})
        return env

    def cpu_seconds(self) -> float | None:
        """The server's CPU so far (a cluster's: its nodes'), where this run started it (None: not ours to read)."""
        if self.cluster:
            return cpu_of([psutil.Process(node.pid) for node in self.cluster.nodes if node.running])
        return cpu_of([psutil.Process(self.server.pid)]) if self.server and self.server.running else None

    def thread_cpu(self) -> dict[str, float]:
        """The server's CPU by thread name (its request handling, the update worker,
        the optimizers' index builds); empty where the server is not ours."""
        if not (self.server and self.server.running):
            return {}
        out: dict[str, float] = {}
        proc = psutil.Process(self.server.pid)
        for t in proc.threads():
            try:
                name = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip().rstrip("0123456789-")
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + t.user_time + t.system_time
        return out

    async def settle(self, collection: str, timeout: float = 600.0, quiet: float = 2.0) -> float:
        """Wait until the collection's optimizers are idle, so a figure does not time the
        index builds its previous writes set off; the seconds waited. Idle: status green
        for `quiet` seconds on end (an optimization is scheduled a moment after the
        writes that call for it, so one green answer right after them proves nothing)."""
        if self.url is None:
            return 0.0
        client = self.client(prefer_grpc=False)
        started = time.perf_counter()
        green_since: float | None = None
        try:
            if not await client.collection_exists(collection):
                return 0.0
            while (now := time.perf_counter()) - started < timeout:
                if (await client.get_collection(collection)).status != "green":
                    green_since = None
                elif green_since is None:
                    green_since = now
                elif now - green_since >= quiet:
                    break
                await asyncio.sleep(0.2)
        finally:
            await client.close()
        return round(time.perf_counter() - started - quiet, 2)

    async def params(self, collection: str) -> dict:
        """The collection's shards, replication and write consistency, as the server reports them."""
        client = self.client(prefer_grpc=False)
        try:
            p = (await client.get_collection(collection)).config.params
        finally:
            await client.close()
        return {"shard_number": p.shard_number, "replication_factor": p.replication_factor,
                "write_consistency_factor": p.write_consistency_factor}

    def cleanup(self) -> list[str]:
        """Delete this run's aliases and collections (a server only); their names."""
        if self.url is None:
            return []

        async def go() -> list[str]:
            client = self.client(prefer_grpc=False)
            gone = []
            try:
                for a in (await client.get_aliases()).aliases:
                    if a.alias_name.startswith(self.prefix):
                        from qdrant_client import models

                        await client.update_collection_aliases(change_aliases_operations=[
                            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=a.alias_name))])
                for c in (await client.get_collections()).collections:
                    if c.name.startswith(self.prefix):
                        await client.delete_collection(c.name)
                        gone.append(c.name)
            finally:
                await client.close()
            return gone

        return asyncio.run(go())


# --- PostgreSQL helpers -------------------------------------------------------------
def settings_for(dsn: str, target: QdrantTarget | None = None, **overrides) -> Settings:
    """Settings of a benchmark; given kafka={...}, the Kafka wing's (StreamSettings)."""
    base = dict(database_url=dsn, collection="bench", log_level="WARNING")
    if target is not None:
        base.update(target.settings())
    if "kafka" in overrides:
        from consumers.settings import StreamSettings

        return StreamSettings(**{**base, **overrides})
    return Settings(**{**base, **overrides})


def new_document(conn: psycopg.Connection, title: str = "bench") -> object:
    sid = conn.execute("INSERT INTO sources (source_type) VALUES ('api') RETURNING id").fetchone()[0]
    return conn.execute("INSERT INTO documents (source_id, title) VALUES (%s, %s) RETURNING id", (sid, title)).fetchone()[0]


def sql(dsn: str, statement: str, params=()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def add_chunks(dsn: str, title: str, texts: list[str]) -> object:
    """One document with one chunk per text, in one transaction; its id."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        doc_id = new_document(conn, title)
        with conn.cursor().copy("COPY chunks (document_id, chunk_index, text) FROM STDIN") as copy:
            for i, t in enumerate(texts):
                copy.write_row((doc_id, i, t))
    return doc_id


def update_metadata(dsn: str, doc_id, rev: int) -> None:
    """One payload-only change of every chunk of the document (one event each)."""
    sql(dsn, "UPDATE chunks SET metadata = jsonb_build_object('rev', %s) WHERE document_id = %s", (rev, doc_id))


def outbox_pending(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM outboxd.outbox").fetchone()[0]


async def drain(settings: Settings, dsn: str, embedder: Embedder, qdrant) -> tuple[NotifyDaemon, float]:
    """A NotifyDaemon run in drain mode on the given Qdrant client; (the daemon, seconds run() took)."""
    daemon = NotifyDaemon(settings, dsn, embedder=embedder, qdrant=qdrant)
    await daemon.start()
    try:
        started = time.perf_counter()
        assert await daemon.run(drain=True) == 0
        return daemon, time.perf_counter() - started
    finally:
        await daemon.close()


# --- encoding made free -------------------------------------------------------------------
class RandomBackend(Backend):
    """Random unit vectors at once: encoding made free. `info`: what load()
    reports (the real model's BackendInfo gives its fingerprint, so the points
    it writes are the real model's as far as outboxd can tell)."""

    kind = "random"

    def __init__(self, info: BackendInfo | None = None, seed: int = 0) -> None:
        self.info = info or BackendInfo(dimension=384, max_seq_length=256, variant="random",
                                        description="random vectors (encoding made free)")
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    async def load(self) -> BackendInfo:
        return self.info

    async def encode(self, texts: list[str]) -> Encoded:
        self.calls += 1
        v = self.rng.standard_normal((len(texts), self.info.dimension)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return Encoded(v, [False] * len(texts))

    async def close(self) -> None:
        return None


def free_embedder(settings: Settings, info: BackendInfo | None = None) -> Embedder:
    return Embedder(settings, backend=RandomBackend(info))


async def converge(dsn: str, target: QdrantTarget, collection: str, info: BackendInfo, batch_size: int = 1024) -> int:
    """Drain every pending event into `collection` with random vectors under the
    real model's fingerprint (info): the points exist, so later metadata updates
    are payload-only for the real daemons. Returns the points written."""
    settings = settings_for(dsn, target, collection=collection, batch_size=batch_size, embedding={"cache_size": 0},
                            reuse_vectors=False)
    embedder = free_embedder(settings, info)
    await embedder.load()
    client = target.client(prefer_grpc=False)
    try:
        d, _ = await drain(settings, dsn, embedder, client)
    finally:
        await client.close()
    return d.stats.upserted


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
