"""`outboxd reindex`: switch the alias to a collection of another model (or
model settings) without read downtime; roll back; drop retired collections."""
from __future__ import annotations

import sys

import click

from daemon.commands.options import json_option, settings_options
from daemon.errors import ConfigError


@click.command(help="Build the collection for the configured model (--model, --max-seq-length, --normalize, or "
               "their OUTBOXD_ variables) from PostgreSQL while the daemons keep the live one current, catch "
               "up, verify, then switch writers and the alias readers use. Restart the daemons with the new "
               "model afterwards.")
@click.option("--rollback", is_flag=True, help="switch back to the most recently retired collection")
@click.option("--rebuild", is_flag=True, help="build a new collection for the same model, configured as the "
              "[qdrant] settings are now (for what Qdrant fixes at creation: the shard number)")
@click.option("--drop-retired", is_flag=True, help="delete retired collections (no rollback after)")
@click.option("--yes", "-y", is_flag=True, help="do not ask before --drop-retired")
@click.option("--page-size", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="chunks embedded per build step")
@json_option
@settings_options(qdrant=True, model=True)
def command(settings, rollback: bool, rebuild: bool, drop_retired: bool, yes: bool, page_size: int,
            as_json: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from daemon.commands.common import print_json

    if sum((rollback, drop_retired, rebuild)) > 1:
        raise click.UsageError("--rollback, --rebuild and --drop-retired are different things: choose one")
    if drop_retired:
        return asyncio.run(_drop_retired(settings, yes))
    result = asyncio.run(_reindex(settings, rollback, page_size, as_json, rebuild))
    if as_json:
        print_json(result.as_dict())
    elif result.status == "already live":
        print(f"{result.collection} ({result.model}) is already the live collection of {result.alias}")
    else:
        print(
            f"{result.alias} now points at {result.collection} ({result.model}): built {result.built}, "
            f"caught up {result.caught_up} in {result.rounds} round(s), {result.seconds:.1f}s.\n"
            f"Restart the daemons with this model's settings. {result.previous} is kept for "
            "`outboxd reindex --rollback`; `outboxd reindex --drop-retired` deletes it."
        )
        for note in result.notes:
            print(note)
    return 0


async def _reindex(settings, rollback: bool, page_size: int, quiet: bool, rebuild: bool = False):
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.admin.reconcile import LOCAL_QDRANT_PAGE, SERVER_QDRANT_PAGE, count_chunks
    from daemon.admin.reindex import Reindexer, retired_collection
    from daemon.commands.common import open_services, progress_bar
    from daemon.core.catalog import view
    from daemon.core.collection_shape import CollectionShape
    from daemon.core.qdrant_connect import location
    from daemon.embedding.embedder import Embedder
    from daemon.embedding.fingerprint import settings_for
    from daemon.outbox.shared_budget import share

    async with open_services(settings) as (pool, client):
        if rollback:
            target = await retired_collection(pool, settings.collection)
            if target is None:
                raise ConfigError(f"no retired collection of {settings.collection!r} to roll back to")
            fp = (await view(client, settings.collection, target)).fingerprint
            embedding = settings.embedding.model_copy(
                update={"name": fp.name, "max_seq_length": fp.max_seq_length, "normalize": fp.normalized}
            )
            settings = settings.model_copy(update={"embedding": embedding})
        embedder = Embedder(settings)
        try:
            await share(embedder.backend, pool)  # a reindex beside running daemons keeps to their budget
            await embedder.load()
            if rollback and embedder.fingerprint != fp:
                raise ConfigError(
                    f"cannot load {fp} to roll back to; loaded {embedder.fingerprint} instead: roll back with "
                    f"the settings that made it: {settings_for(fp)}"
                )
            tty = sys.stderr.isatty() and not quiet
            total = await count_chunks(pool) if tty else None
            with progress_bar(total, "building", tty) as advance:
                return await Reindexer(
                    pool,
                    client,
                    settings.collection,
                    embedder,
                    page_size=page_size,
                    qdrant_page_size=SERVER_QDRANT_PAGE if settings.qdrant.url else LOCAL_QDRANT_PAGE,
                    progress=advance,
                    qdrant_location=location(settings),
                    shape=CollectionShape.of(settings),
                    rebuild=rebuild,
                ).run()
        finally:
            await embedder.close()


async def _drop_retired(settings, yes: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import open_services
    from daemon.core.catalog import Catalog
    from daemon.core.qdrant_store import QdrantStore

    async with open_services(settings) as (pool, client):
        catalog = Catalog(pool)
        retired = await catalog.retired(settings.collection)
        if not retired:
            print("no retired collections")
            return 0
        names = ", ".join(r.name for r in retired)
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(f"refusing to delete {names} without --yes (no terminal to ask on)")
            if input(f"Delete {names}? Rollback will no longer be possible. [y/N] ").strip().lower() != "y":
                return 0
        for r in retired:
            await QdrantStore(client, settings.collection, r.name).drop()
            await catalog.forget(r.name)
        print(f"deleted {names}")
        return 0
