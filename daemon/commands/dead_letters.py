"""`outboxd dead-letters`: events that kept failing — list them, send them
back to pending, or delete them.

retry and purge act on an explicit selection (--id N, --error PATTERN or
--all), never on everything by default; purge asks first on a terminal and
needs --yes elsewhere.
"""
from __future__ import annotations

import sys

import click

from daemon.commands.options import json_option, settings_options

COLUMNS = ["id", "chunk_id", "op", "attempts", "first_failed_at", "last_failed_at", "last_error"]
SELECTION = "--id N (repeatable), --error PATTERN or --all"


@click.command(help="list: dead letters with their error and attempts (a selection filters them). retry: back "
               "to pending with attempts reset. purge: delete them (their chunks keep whatever Qdrant has until "
               "they change again). retry and purge need --id, --error or --all.")
@click.argument("action", type=click.Choice(["list", "retry", "purge"]))
@click.option("--id", "ids", type=int, multiple=True, metavar="N", help="this event id (repeatable)")
@click.option("--error", metavar="PATTERN",
              help="those whose last error contains PATTERN (case-insensitive, ILIKE)")
@click.option("--all", "every", is_flag=True, help="every dead letter")
@click.option("--yes", "-y", is_flag=True, help="purge without asking for confirmation")
@json_option
@settings_options()
def command(settings, action: str, ids: tuple[int, ...], error: str | None, every: bool, yes: bool,
            as_json: bool) -> int:
    if sum([bool(ids), error is not None, every]) > 1:
        raise click.UsageError(f"choose one selection: {SELECTION}")
    if error is not None and not error.strip():
        raise click.UsageError("--error needs a non-empty PATTERN (use --all for every dead letter)")
    selected = selection(list(ids), error, every)
    if action != "list" and selected is None:
        raise click.UsageError(f"{action} needs a selection: {SELECTION}")
    if yes and action != "purge":
        raise click.UsageError("--yes is for purge")

    from daemon.commands.common import connect, print_json, print_table
    from db.queries import query

    with connect(settings) as conn:
        if action == "list":
            rows = conn.execute(query("dead_letters")).fetchall()
            if selected is not None:
                keep = {r["id"] for r in conn.execute(query("select_dead_letters"), selected)}
                rows = [r for r in rows if r["id"] in keep]
            if as_json:
                print_json(rows)
            else:
                print_table(rows, COLUMNS, title=f"{len(rows)} dead letter(s)")
            return 0

        if action == "retry":
            done = [r["id"] for r in conn.execute(query("retry_dead_letters"), selected).fetchall()]
            report(as_json, ids, "retried", done, f"{len(done)} dead letter(s) back to pending")
            return 0

        # purge: confirm the count of exactly the rows that will go
        chosen = [r["id"] for r in conn.execute(query("select_dead_letters"), selected).fetchall()]
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(
                    f"purge would delete {len(chosen)} dead letter(s); not asking without a terminal: add --yes"
                )
            if chosen and not confirmed(len(chosen)):
                print("nothing deleted")
                return 0
        done = (
            [r["id"] for r in conn.execute(query("purge_dead_letters"), {"event_ids": chosen}).fetchall()]
            if chosen else []
        )
        report(as_json, ids, "deleted", done, f"{len(done)} dead letter(s) deleted")
        return 0


def selection(ids: list[int], error: str | None, every: bool) -> dict | None:
    """The query parameters of --id / --error / --all, or None when none was given."""
    if not (ids or error is not None or every):
        return None
    return {"event_ids": ids or None, "error_pattern": error, "all": every}


def confirmed(count: int) -> bool:
    sys.stderr.write(f"Delete {count} dead letters? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def report(as_json: bool, asked: tuple[int, ...], verb: str, done: list[int], sentence: str) -> None:
    from daemon.commands.common import print_json

    if as_json:
        print_json({verb: len(done), "ids": done})
    else:
        print(sentence)
    missing = sorted(set(asked) - set(done))
    if missing:
        print(f"outboxd dead-letters: not a dead letter: {', '.join(map(str, missing))}", file=sys.stderr)
