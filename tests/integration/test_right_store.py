"""Invariant 9: the right store or none. With a configured database, outboxd
writes only to the Qdrant it was told to use, and only where the catalog says
the live collection was built: a Qdrant left unnamed, or another Qdrant (a
mistyped URL, a staging server, a fresh local folder), is refused with 78
before anything is written there. A collection that was really lost is
recreated only when the operator says so, and then rebuilt from PostgreSQL.
"""
from __future__ import annotations

import asyncio

import pytest
from qdrant_client import AsyncQdrantClient

from daemon.core.qdrant_store import UID_KEY, QdrantStore, physical_name
from tests.integration.test_exit_codes import EXIT_CONFIG, converge, outboxd, report
from tests.processes import base_env, qdrant_env
from tests.support import add_document, assert_converged, drain, open_qdrant, physical_collection, qdrant_choice

pytestmark = [pytest.mark.integration]


def local_collections(path) -> list[str]:
    """The collections a local-mode folder holds (none where it was never created)."""
    async def read() -> list[str]:
        client = AsyncQdrantClient(path=str(path))
        try:
            return [c.name for c in (await client.get_collections()).collections]
        finally:
            await client.close()

    return asyncio.run(read()) if path.exists() else []


@pytest.mark.parametrize("argv", [["run", "--drain"], ["reconcile", "--check"], ["status"], ["search", "stars"]],
                         ids=" ".join)
def test_a_configured_database_needs_qdrant_named(argv, dsn, tmp_path):
    """DATABASE_URL set, QDRANT_URL mistyped: 78 at once, naming QDRANT_URL and the typo;
    no local-mode folder appears where the vectors would have gone."""
    env = base_env(DATABASE_URL=dsn, QDRANT_URLL="http://127.0.0.1:26333", OUTBOXD_DATA_DIR=str(tmp_path / "data"))
    result = outboxd(argv, env, tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert "set QDRANT_URL" in result.stderr and "QDRANT_URLL is set" in result.stderr, report(result)
    assert "Traceback" not in result.stderr, report(result)
    assert not (tmp_path / "data" / "qdrant").exists() and not (tmp_path / ".outboxd").exists()


def test_strict_refuses_a_mistyped_conventional_name(dsn, tmp_path):
    """QDRANT_URLL has no OUTBOXD_ prefix, but it is one letter from QDRANT_URL: a warning
    for a command that needs no Qdrant, 78 with --strict."""
    env = base_env(DATABASE_URL=dsn, QDRANT_URLL="http://127.0.0.1:26333")
    warned = outboxd(["migrate"], env, tmp_path)
    assert warned.returncode == 0, report(warned)
    assert "QDRANT_URLL is not read by outboxd; did you mean QDRANT_URL?" in warned.stderr, report(warned)
    strict = outboxd(["migrate", "--strict"], env, tmp_path)
    assert strict.returncode == EXIT_CONFIG, report(strict)
    assert "did you mean QDRANT_URL?" in strict.stderr, report(strict)


@pytest.mark.slow
def test_another_qdrant_is_refused_and_nothing_is_written_there(conn, dsn, collection, embedder, make_settings,
                                                                  tmp_path):
    """Converged in the session's Qdrant; then pointed at another (an empty local folder):
    run, reconcile and status refuse with 78 naming the live collection and the fix, and
    the other Qdrant still holds nothing."""
    home, other = tmp_path / "qdrant", tmp_path / "other"
    add_document(conn, ["the first chunk", "the second chunk"])
    asyncio.run(converge(make_settings, home, dsn, embedder, collection))
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_QDRANT__PATH=str(other),
                   OUTBOXD_STARTUP_TIMEOUT=20)
    for argv in (["run", "--drain"], ["reconcile", "--check"], ["status"]):
        result = outboxd(argv, env, tmp_path)
        assert result.returncode == EXIT_CONFIG, report(result)
        assert f"the live collection of {collection!r}" in result.stderr, report(result)
        assert "does not have it" in result.stderr and "--recreate-missing" in result.stderr, report(result)
    assert local_collections(other) == []


@pytest.mark.slow
def test_a_collection_of_the_same_name_in_another_qdrant_is_refused(conn, dsn, collection, embedder, make_settings,
                                                                      tmp_path):
    """The other Qdrant holds a collection of the same name and model (a staging server
    another deployment filled): it is not the one the catalog recorded, so it is refused."""
    home, other = tmp_path / "qdrant", tmp_path / "other"
    add_document(conn, ["a chunk"])
    asyncio.run(converge(make_settings, home, dsn, embedder, collection))

    async def impostor() -> None:
        client = AsyncQdrantClient(path=str(other))
        try:
            store = QdrantStore(client, collection, collection=physical_name(collection, embedder.fingerprint))
            await store.create_physical(embedder.fingerprint)
            await store.point_alias()
        finally:
            await client.close()

    asyncio.run(impostor())
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_QDRANT__PATH=str(other))
    result = outboxd(["run", "--drain"], env, tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert "with another id" in result.stderr, report(result)


@pytest.mark.slow
def test_a_lost_collection_is_recreated_only_when_the_operator_says_so(conn, dsn, collection, embedder,
                                                                        make_settings, tmp_path):
    """The live collection deleted from the right Qdrant: the daemon refuses (it cannot tell
    a lost collection from a wrong address); `reconcile --repair --recreate-missing` creates
    it empty and enqueues every chunk; the daemon then converges it."""
    path = tmp_path / "qdrant"
    add_document(conn, [f"chunk number {i}" for i in range(5)])
    asyncio.run(converge(make_settings, path, dsn, embedder, collection))

    async def lose() -> None:
        client = open_qdrant(path)
        try:
            await client.delete_collection(await physical_collection(client, collection))
        finally:
            await client.close()

    asyncio.run(lose())
    env = base_env(DATABASE_URL=dsn, OUTBOXD_COLLECTION=collection, OUTBOXD_STARTUP_TIMEOUT=20, **qdrant_env(path))
    refused = outboxd(["run", "--drain"], env, tmp_path)
    assert refused.returncode == EXIT_CONFIG and "does not have it" in refused.stderr, report(refused)
    usage = outboxd(["reconcile", "--recreate-missing"], env, tmp_path)
    assert usage.returncode == 2 and "goes with --repair" in usage.stderr, report(usage)

    rebuilt = outboxd(["reconcile", "--repair", "--recreate-missing"], env, tmp_path)
    assert rebuilt.returncode == 0 and "repair: 5 event(s) enqueued" in rebuilt.stdout, report(rebuilt)

    async def converged() -> None:
        client = open_qdrant(path)
        try:
            await drain(make_settings(**qdrant_choice(path)), dsn, embedder, client)
            assert await assert_converged(dsn, client, await physical_collection(client, collection), embedder) == 5
        finally:
            await client.close()

    asyncio.run(converged())


@pytest.mark.slow
def test_the_embedded_defaults_rebuild_a_lost_collection_by_themselves(conn, dsn, collection, embedder,
                                                                       make_settings, tmp_path):
    """Without configured services (PostgreSQL and Qdrant both under the data directory), a
    lost local-mode folder is recreated and every chunk enqueued, with no operator step."""
    path = tmp_path / "qdrant"
    add_document(conn, [f"chunk number {i}" for i in range(4)])
    embedded = make_settings(database_url=None, qdrant={"url": None, "path": path})
    assert embedded.services_configured() == []

    async def run_twice() -> None:
        client = AsyncQdrantClient(path=str(path))
        try:
            await drain(embedded, dsn, embedder, client)
            name = await physical_collection(client, collection)
            uid = (await client.get_collection(name)).config.metadata[UID_KEY]
            await client.delete_collection(name)
            daemon = await drain(embedded, dsn, embedder, client)
            assert daemon.stats.as_dict()["upserted"] == 4
            assert await assert_converged(dsn, client, name, embedder) == 4
            assert (await client.get_collection(name)).config.metadata[UID_KEY] != uid
        finally:
            await client.close()

    asyncio.run(run_twice())
    row = conn.execute("SELECT qdrant_uid, qdrant_location FROM outboxd.collections WHERE alias = %s",
                       (collection,)).fetchone()
    assert row[0] is not None and row[1] == str(path.resolve())


@pytest.mark.parametrize("argv", [["run", "--drain"], ["status"], ["reconcile", "--check"], ["migrate"]], ids=" ".join)
def test_a_qdrant_server_without_a_database_is_refused(argv, tmp_path):
    """QDRANT_URL set, DATABASE_URL missing: an embedded PostgreSQL would hold no chunks, and
    every point of the server would look orphaned (the verifier would delete them). 78,
    and no embedded PostgreSQL is started."""
    env = base_env(QDRANT_URL="http://127.0.0.1:1", OUTBOXD_DATA_DIR=str(tmp_path / "data"))
    result = outboxd(argv, env, tmp_path)
    assert result.returncode == EXIT_CONFIG, report(result)
    assert "DATABASE_URL is not set" in result.stderr and "Traceback" not in result.stderr, report(result)
    assert not (tmp_path / "data" / "postgres").exists()
