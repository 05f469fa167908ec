"""`outboxd reindex` on real PostgreSQL, Qdrant and MiniLM: a new collection for
other model settings (MiniLM reading 128 tokens instead of 256) is built
under concurrent writes while the old daemon keeps the live one current;
readers' alias moves only once the new collection has caught up; the old
daemon stops acknowledging; the new one converges it; rollback works."""
from __future__ import annotations

import asyncio
import random

import pytest

from daemon import cli
from daemon.admin.reconcile import Reconciler
from daemon.admin.reindex import Reindexer, retired_collection
from daemon.config import Settings
from daemon.core.catalog import Catalog
from daemon.core.qdrant_store import physical_name
from daemon.embedding.embedder import Embedder
from daemon.errors import EXIT_CONFIG
from daemon.outbox.notify_daemon import NotifyDaemon
from tests.support import (
    add_document,
    assert_converged,
    drain,
    outbox_rows,
    physical_collection,
    projection_of,
    wait_until,
)

LONG = " ".join(f"token{i}" for i in range(200))  # past 128 tokens: the two settings embed it differently


@pytest.fixture(scope="module")
def short_window_embedder():
    emb = Embedder(Settings(embedding={"max_seq_length": 128}))
    asyncio.run(emb.load())
    yield emb
    asyncio.run(emb.close())


async def test_reindex_under_concurrent_writes_then_rollback(
    conn, dsn, qdrant, collection, embedder, short_window_embedder, make_settings, pool
):
    old_settings, new_settings = make_settings(), make_settings(embedding={"max_seq_length": 128})
    new = short_window_embedder
    _, ids = add_document(conn, [f"chunk {i} " + (LONG if i % 5 == 0 else "short text") for i in range(60)])
    old = NotifyDaemon(old_settings, dsn, embedder=embedder, qdrant=qdrant)
    await old.start()
    old_run = asyncio.create_task(old.run())
    await wait_until(lambda: not outbox_rows(conn), "the old daemon to drain the first backlog")
    before = await physical_collection(qdrant, collection)

    seen: list[str] = []
    rng = random.Random(3)

    async def watch_alias():
        while True:
            seen.append(await physical_collection(qdrant, collection))
            await asyncio.sleep(0.01)

    async def write():
        for round_ in range(8):
            with conn.transaction():
                for cid in rng.sample(ids[1:], 6):
                    conn.execute("UPDATE chunks SET text = text || %s WHERE id = %s", (f" v{round_}", cid))
            add_document(conn, [f"added during reindex {round_}"])
            await asyncio.sleep(0.2)  # writes spread over the reindex, not a synchronisation

    watcher = asyncio.create_task(watch_alias())
    writer = asyncio.create_task(write())
    try:
        result = await Reindexer(pool, qdrant, collection, new, page_size=16).run()
        await writer
    finally:
        watcher.cancel()

    target = physical_name(collection, new.fingerprint)
    assert result.status == "switched" and result.collection == target and result.previous == before
    assert result.built >= 60
    # Readers saw the old collection until the switch and the new one after it, nothing else.
    switch = seen.index(target) if target in seen else len(seen)
    assert set(seen[:switch]) <= {before} and set(seen[switch:]) <= {target}
    assert await physical_collection(qdrant, collection) == target
    records = {r.name: r.status for r in await Catalog(pool).records(collection)}
    assert records == {before: "retired", target: "live"}

    # The old model's daemon may no longer acknowledge: its next batch ends it with exit 78.
    conn.execute("UPDATE chunks SET text = 'written after the switch' WHERE id = %s", (ids[0],))
    assert await asyncio.wait_for(old_run, 60) == EXIT_CONFIG
    await old.close()
    assert outbox_rows(conn), "the event stays for the new model's daemon"

    await drain(new_settings, dsn, new, qdrant)
    await assert_converged(dsn, qdrant, collection, new)
    assert (await Reconciler(pool, qdrant, target, await projection_of(qdrant, target, new.fingerprint.id)).run()
            ).drift == 0

    # Rollback: back to the retired collection, caught up with what changed meanwhile.
    conn.execute("UPDATE chunks SET text = 'changed while the new model was live' WHERE id = %s", (ids[1],))
    await drain(new_settings, dsn, new, qdrant)
    assert (await retired_collection(pool, collection)).name == before
    back = await Reindexer(pool, qdrant, collection, embedder).run()
    assert back.collection == before and back.built == 68  # a rebuild pass that skips unchanged points
    assert await physical_collection(qdrant, collection) == before
    await drain(old_settings, dsn, embedder, qdrant)
    await assert_converged(dsn, qdrant, collection, embedder)


async def test_reindex_to_the_live_model_does_nothing(conn, dsn, qdrant, collection, embedder, make_settings, pool):
    add_document(conn, ["a chunk"])
    await drain(make_settings(), dsn, embedder, qdrant)
    result = await Reindexer(pool, qdrant, collection, embedder).run()
    assert result.status == "already live"


def test_reindex_cli_without_a_collection_says_what_to_do(dsn, collection, tmp_path, capsys, monkeypatch):
    """Nothing to reindex before the daemon ever ran: exit 78 and the next step."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    code = cli.main(["reindex", "--qdrant-path", str(tmp_path / "q"), "--model", embedder_name()])
    assert code == EXIT_CONFIG
    assert "outboxd run" in capsys.readouterr().err


def embedder_name() -> str:
    from daemon.config import DEFAULT_MODEL

    return DEFAULT_MODEL


def test_drop_retired_needs_yes_without_a_terminal(dsn, collection, tmp_path, capsys, monkeypatch):
    """--drop-retired refuses without --yes when nobody can answer."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outboxd.collections (name, alias, model_name, dimension, normalized, fingerprint_id, status) "
            "VALUES (%s, %s, 'm', 4, true, 'x', 'retired')",
            (f"{collection}__old", collection),
        )
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("OUTBOXD_COLLECTION", collection)
    base = ["reindex", "--drop-retired", "--qdrant-path", str(tmp_path / "q")]
    assert cli.main(base + ["--rollback"]) == 2  # two different things
    assert cli.main(base) == 2
    assert "--yes" in capsys.readouterr().err
    assert cli.main(base + ["--yes"]) == 0
    assert f"deleted {collection}__old" in capsys.readouterr().out
