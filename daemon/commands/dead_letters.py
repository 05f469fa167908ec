"""`outboxd dead-letters`: events that kept failing — list them, send them
back to pending, or delete them.

retry and purge act on an explicit selection (--id N, --error PATTERN or
--all), never on everything by default; purge asks first on a terminal and
needs --yes elsewhere.
"""
from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click

from daemon.commands.options import json_option, settings_options

COLUMNS = ["id", "chunk_id", "op", "last_failed_at", "last_error"]  # the table's; --json has every field
SELECTION = "--id N (repeatable), --error PATTERN or --all"
ERROR_MIN_WIDTH = 30  # the error's share of a narrow table, for which last_failed_at is left out


@click.command(help="list: dead letters, one line each with its error cut to fit (--json: every field, the error "
               "whole; a selection filters them). retry: back "
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

    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    return asyncio.run(_act(settings, action, selected, ids, yes, as_json))


async def _act(settings, action: str, selected: dict | None, ids: tuple[int, ...], yes: bool, as_json: bool) -> int:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import open_services, print_json
    from db.dead_letters import DeadLetters

    async with open_services(settings, qdrant=False) as (pool, _):
        dead_letters = DeadLetters(pool)
        if action == "list":
            rows = await dead_letters.listing(selected)
            if as_json:
                print_json(rows)
            else:
                print_dead_letters(rows)
            return 0

        if action == "retry":
            done = await dead_letters.retry(selected)
            report(as_json, ids, "retried", done, f"{len(done)} dead letter(s) back to pending")
            return 0

        # purge: confirm the count of exactly the rows that will go
        chosen = await dead_letters.selected(selected)
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(
                    f"purge would delete {len(chosen)} dead letter(s); not asking without a terminal: add --yes"
                )
            if chosen and not confirmed(len(chosen)):
                print("nothing deleted")
                return 0
        done = await dead_letters.purge(chosen)
        report(as_json, ids, "deleted", done, f"{len(done)} dead letter(s) deleted")
        return 0


def print_dead_letters(rows: list[dict[str, Any]]) -> None:
    """One line per dead letter: its ids whole (for grep and --id), its error cut
    to the width that is left, since an error can run to pages; --json has it
    whole, and the attempts (which are OUTBOXD_MAX_ATTEMPTS for nearly all)."""
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from rich.table import Column, Table
    from rich.text import Text

    from daemon.commands.common import console

    out = console()
    names = COLUMNS[:-1]
    cells = [[str(r["id"]), str(r["chunk_id"]), r["op"], _when(r["last_failed_at"])] for r in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(names)]

    def room(kept: int) -> int:  # the error's width beside the first `kept` columns: 3 per column for rule and padding
        return out.width - sum(widths[:kept]) - 3 * (kept + 1) - 1

    kept = len(names) if room(len(names)) >= ERROR_MIN_WIDTH else len(names) - 1  # narrow: the time gives way
    # the error is the one column that gives way; its Text stays on one line and ends in an ellipsis
    columns = [Column("id", no_wrap=True, justify="right"), *(Column(name, no_wrap=True) for name in names[1:kept]),
               Column(COLUMNS[-1])]
    caption = "errors cut to one line: `outboxd dead-letters list --json` prints them whole" if rows else None
    table = Table(*columns, title=f"{len(rows)} dead letter(s)", caption=caption)
    for row, values in zip(rows, cells):
        error = " ".join((row["last_error"] or "").split())
        table.add_row(*values[:kept], Text(error, no_wrap=True, overflow="ellipsis"))
    out.print(table)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


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
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from daemon.commands.common import print_json

    if as_json:
        print_json({verb: len(done), "ids": done})
    else:
        print(sentence)
    missing = sorted(set(asked) - set(done))
    if missing:
        print(f"outboxd dead-letters: not a dead letter: {', '.join(map(str, missing))}", file=sys.stderr)
