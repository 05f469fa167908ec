"""Setting up the collection against what may already be there: N daemons and
consumers starting at once on an empty Qdrant server (the check-then-act race,
its timing staged by tests/staged_race.py, every answer the server's own), a
hand-made collection that cannot hold the model's vectors, and local mode's
one-process limit (in local mode, whatever Qdrant the session uses)."""
from __future__ import annotations

import asyncio

import pytest
from qdrant_client import AsyncQdrantClient, models

from daemon.core.qdrant_connect import make_client
from daemon.core.qdrant_store import QdrantStore
from daemon.errors import EXIT_CONFIG, ConfigError
from daemon.outbox.notify_daemon import NotifyDaemon
from tests.staged_race import RacingStarters
from tests.support import require_server

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def test_daemons_starting_together_on_an_empty_server_all_come_up(dsn, qdrant, collection, embedder, make_settings):
    """Three daemons start side by side on a fresh collection: each one's
    "does it exist?" is answered before any of them created it, so two of them
    get the server's 409 on create; all three come up on the same collection."""
    require_server()
    server = RacingStarters(qdrant, starters=3)
    daemons = [NotifyDaemon(make_settings(worker_name=f"w{i}"), dsn, embedder=embedder, qdrant=server) for i in range(3)]
    try:
        await asyncio.gather(*(d.start() for d in daemons))
        assert server.conflicts >= 2, "the race was not staged: every starter should have seen no collection"
        physical = {d.writer.store.collection for d in daemons}
        assert len(physical) == 1
        store = QdrantStore(qdrant, collection)
        assert await store.resolve() == physical.pop()
        assert await store.recorded_fingerprint() == embedder.fingerprint
    finally:
        for d in daemons:
            await d.close()


async def test_consumers_starting_together_all_come_up(qdrant, collection, embedder):
    """The Kafka consumers' path (ensure_collection without a catalog), five at once."""
    require_server()
    server = RacingStarters(qdrant, starters=5)
    stores = [QdrantStore(server, collection) for _ in range(5)]
    await asyncio.gather(*(s.ensure_collection(embedder.fingerprint) for s in stores))
    assert server.conflicts >= 4
    assert len({s.collection for s in stores}) == 1
    info = await qdrant.get_collection(stores[0].collection)
    assert info.config.params.vectors.size == embedder.fingerprint.dimension


@pytest.mark.parametrize(
    "vectors, says",
    [
        (models.VectorParams(size=128, distance=models.Distance.COSINE), "128-dimensional"),
        (models.VectorParams(size=384, distance=models.Distance.DOT), "compared by Dot"),
        ({"text": models.VectorParams(size=384, distance=models.Distance.COSINE)}, "named vectors"),
    ],
    ids=["dimension", "distance", "named"],
)
async def test_a_collection_that_cannot_hold_the_models_vectors_is_refused(dsn, qdrant, collection, embedder, make_settings, vectors, says):
    """An empty collection made by hand with other vector parameters is not
    adopted (every write would fail as a dead letter): start-up stops with 78,
    saying what the collection stores, what the model makes, and the fix."""
    await qdrant.create_collection(collection, vectors_config=vectors)
    daemon = NotifyDaemon(make_settings(), dsn, embedder=embedder, qdrant=qdrant)
    try:
        with pytest.raises(ConfigError) as raised:
            await daemon.start()
    finally:
        await daemon.close()
    message = str(raised.value)
    assert raised.value.exit_code == EXIT_CONFIG
    assert says in message and collection in message and "OUTBOXD_COLLECTION" in message
    assert not (await qdrant.get_collection(collection)).config.metadata, "the collection was adopted anyway"


def test_a_second_process_on_a_local_mode_folder_is_a_configuration_error(make_settings, tmp_path):
    """Local mode admits one process per folder: the second gets ConfigError
    (exit 78) naming the folder and the way out (a Qdrant server), not a
    RuntimeError (exit 1, restarted in a loop by a supervisor)."""
    settings = make_settings(qdrant={"path": tmp_path / "shared-qdrant"})
    first = make_client(settings)
    try:
        with pytest.raises(ConfigError) as raised:
            make_client(settings)
    finally:
        asyncio.run(first.close())
    message = str(raised.value)
    assert raised.value.exit_code == EXIT_CONFIG
    assert str(tmp_path / "shared-qdrant") in message and "QDRANT_URL" in message


def test_the_cli_exits_78_when_another_process_holds_the_local_folder(dsn, collection, tmp_path):
    """`outboxd run` beside a process that holds the folder: exit 78 and the reason, quickly."""
    import subprocess
    import sys

    from tests.processes import daemon_env

    folder = tmp_path / "held-qdrant"
    holder = AsyncQdrantClient(path=str(folder))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "run", "--drain"],
            env=daemon_env(dsn, folder, collection, local_mode=True), capture_output=True, text=True, timeout=120,
        )
    finally:
        asyncio.run(holder.close())
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    assert "already open in another process" in done.stderr and "QDRANT_URL" in done.stderr
    assert "Traceback" not in done.stderr
