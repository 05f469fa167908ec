"""`outboxd reindex`: switch the alias to a collection of another model (or
model settings) without read downtime; roll back; drop retired collections."""
from __future__ import annotations

import asyncio
import sys

from daemon.commands.common import open_services, print_json, progress_bar
from daemon.embedding.embedder import Embedder
from daemon.errors import EXIT_OK, EXIT_USAGE, ConfigError
from daemon.admin.drift import LOCAL_QDRANT_PAGE, SERVER_QDRANT_PAGE, count_chunks
from daemon.admin.model_switch import Reindexer, retired_collection


def register(sub, parents) -> None:
    p = sub.add_parser(
        "reindex",
        parents=parents,
        help="build a collection for --model (or other model settings) and switch the alias to it",
        description="Builds the collection for the configured model (--model, --max-seq-length, --normalize) "
        "from PostgreSQL while the daemon keeps the live one current, catches up, verifies, then switches "
        "writers and the alias readers use. Restart the daemons with the new model afterwards.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rollback", action="store_true", help="switch back to the most recently retired collection")
    mode.add_argument("--drop-retired", action="store_true", help="delete retired collections (no rollback after)")
    p.add_argument("--yes", action="store_true", help="do not ask before --drop-retired")
    p.add_argument("--page-size", type=int, default=256, metavar="N", help="chunks embedded per build step")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    if args.drop_retired:
        return asyncio.run(_drop_retired(settings, args.yes))
    result = asyncio.run(_reindex(settings, args.rollback, args.page_size, args.json))
    if args.json:
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
    return EXIT_OK


async def _reindex(settings, rollback: bool, page_size: int, quiet: bool):
    async with open_services(settings) as (pool, client):
        if rollback:
            target = await retired_collection(pool, settings.collection)
            if target is None:
                raise ConfigError(f"no retired collection of {settings.collection!r} to roll back to")
            fp = target.fingerprint
            settings = settings.model_copy(
                update={"model": fp.name, "max_seq_length": fp.max_seq_length, "normalize": fp.normalized}
            )
        embedder = Embedder(settings)
        try:
            await embedder.load()
            if rollback and embedder.fingerprint != fp:
                raise ConfigError(f"cannot load {fp} to roll back to; loaded {embedder.fingerprint} instead")
            tty = sys.stderr.isatty() and not quiet
            total = await count_chunks(pool) if tty else None
            with progress_bar(total, "building", tty) as advance:
                return await Reindexer(
                    pool,
                    client,
                    settings.collection,
                    embedder,
                    page_size=page_size,
                    qdrant_page_size=SERVER_QDRANT_PAGE if settings.qdrant_url else LOCAL_QDRANT_PAGE,
                    progress=advance,
                ).run()
        finally:
            embedder.close()


async def _drop_retired(settings, yes: bool) -> int:
    from daemon.core.catalog import Catalog

    async with open_services(settings) as (pool, client):
        catalog = Catalog(pool)
        retired = [r for r in await catalog.records(settings.collection) if r.status == "retired"]
        if not retired:
            print("no retired collections")
            return EXIT_OK
        names = ", ".join(r.name for r in retired)
        if not yes:
            if not sys.stdin.isatty():
                print(f"refusing to delete {names} without --yes", file=sys.stderr)
                return EXIT_USAGE
            if input(f"Delete {names}? Rollback will no longer be possible. [y/N] ").strip().lower() != "y":
                return EXIT_OK
        for r in retired:
            if await client.collection_exists(r.name):
                await client.delete_collection(r.name)
            await catalog.forget(r.name)
        print(f"deleted {names}")
        return EXIT_OK
