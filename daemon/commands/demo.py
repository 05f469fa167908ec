"""`outboxd demo`: the whole pipeline on a fresh machine, with nothing configured.

It starts the embedded defaults in a folder of its own (`<data-dir>/demo`): a
real PostgreSQL from pgserver, Qdrant's local mode, the packaged MiniLM. It
loads the sample corpus that ships with outboxd (once), runs the daemon in
drain mode until the collection has converged, runs a few hybrid searches,
then edits a chunk's text, retitles a document and deletes another, and shows
the points following. Everything it starts has stopped when it exits.

It refuses to run against a configured DATABASE_URL or QDRANT_URL: it writes a
corpus, and a real database is no place for that. The story is
daemon.demo.narrative; the embedded stores and signals, daemon.demo.embedded.
"""
from __future__ import annotations

import logging
import sys
import time

import click

from daemon.commands.options import settings_options
from daemon.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

DEMO_BATCH_SIZE = 16  # events per claim in the demo: 106 chunks converge in 7 steps


@click.command(help="Start the embedded PostgreSQL, Qdrant local mode and the packaged model in <data-dir>/demo, "
               "load a sample corpus, run the daemon until the collection has converged, run example hybrid "
               "searches, then change and delete some chunks and show the points following. Leaves nothing "
               "running. Refuses to run with DATABASE_URL or QDRANT_URL set.")
@click.option("--fresh", is_flag=True, help="wipe the demo's folder first and start over")
@settings_options()
def command(settings, fresh: bool) -> int:
    started = time.monotonic()  # "Done in": the demo's own time, not a `pip install &&` before it

    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.demo.embedded import EmbeddedStores, stop_on_sigterm
    from daemon.demo.narrative import Demo

    configured = [
        name
        for name, value in (("DATABASE_URL", settings.database_url), ("QDRANT_URL", settings.qdrant.url))
        if value is not None
    ]
    if configured:
        names = " and ".join(configured)
        print(
            f"outboxd demo: {names} {'is' if len(configured) == 1 else 'are'} set (environment, .env, config "
            "file or flag). The demo writes a sample corpus, so it runs only on its own embedded PostgreSQL and "
            f"Qdrant local mode, never on a configured server. Run it without {names}, e.g. "
            f"`env -u {' -u '.join(configured)} outboxd demo`.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if "log_level" not in settings.model_fields_set:  # neither --log-level, OUTBOXD_LOG_LEVEL nor a config key
        logging.getLogger().setLevel(logging.WARNING)  # the demo tells its own story; logs only for trouble

    stores = EmbeddedStores(settings.data_dir / "demo")
    problem = stores.prepare(fresh=fresh)
    if problem:
        print(f"outboxd demo: {problem}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    demo_settings = settings.model_copy(
        update={
            "data_dir": stores.demo_dir,
            "qdrant": settings.qdrant.model_copy(update={"path": stores.demo_dir / "qdrant"}),
            # A drain ends when every worker saw nothing pending; a worker that found the
            # others' claims in flight looks again after this long.
            "poll_interval": min(settings.poll_interval, 0.2),
            # The whole corpus fits one claim; smaller ones let the progress bar move
            # (OUTBOXD_BATCH_SIZE, where set, wins).
            "batch_size": settings.batch_size if "batch_size" in settings.model_fields_set else DEMO_BATCH_SIZE,
        }
    )
    demo = Demo(demo_settings, stores, hint=hint(settings, stores.demo_dir), started=started)
    stop_on_sigterm()  # stop like Ctrl-C: close everything, stop PostgreSQL
    code = EXIT_FAILURE
    try:
        code = demo.run(fresh=fresh)
    finally:
        still_up = stores.stop_postgres()
    if code == EXIT_OK:
        demo.finish(still_up)
    return code


def hint(settings, demo_dir) -> tuple[list[str], list[str]]:
    """What points another outboxd command (run, status, search, reconcile) at the
    demo's stores: VARIABLE=value words for settings that are no flags, and flags."""
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.config import DEFAULT_MODEL
    from daemon.demo.embedded import shown

    env, flags = [], ["--data-dir", shown(demo_dir)]
    if settings.qdrant.path is not None:  # OUTBOXD_QDRANT__PATH would send it elsewhere
        flags += ["--qdrant-path", shown(demo_dir / "qdrant")]
    if settings.collection != "chunks":
        env.append(f"OUTBOXD_COLLECTION={settings.collection}")
    if settings.embedding.name != DEFAULT_MODEL:
        env.append(f"OUTBOXD_EMBEDDING__NAME={settings.embedding.name}")
    return env, flags
