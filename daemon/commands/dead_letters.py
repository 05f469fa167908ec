"""`outboxd dead-letters`: events that kept failing — list them, send them
back to pending, or delete them.

retry and purge act on an explicit selection (--id N, --error PATTERN or
--all), never on everything by default; purge asks first on a terminal and
needs --yes elsewhere.
"""
from __future__ import annotations

import sys

from daemon.commands.common import connect, print_json, print_table
from daemon.errors import EXIT_OK, EXIT_USAGE
from db.queries import query

COLUMNS = ["id", "chunk_id", "op", "attempts", "first_failed_at", "last_failed_at", "last_error"]


def register(sub, parents) -> None:
    p = sub.add_parser(
        "dead-letters",
        parents=parents,
        help="list, retry or purge events that kept failing",
        description="list: dead letters with their error and attempts (a selection filters them). "
        "retry: back to pending with attempts reset. purge: delete them (their chunks keep whatever "
        "Qdrant has until they change again). retry and purge need --id, --error or --all.",
    )
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("--id", type=int, action="append", dest="ids", metavar="N", help="this event id (repeatable)")
    p.add_argument("--error", metavar="PATTERN", help="those whose last error contains PATTERN (case-insensitive, ILIKE)")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--yes", "-y", action="store_true", help="purge without asking for confirmation")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table or a sentence")
    p.set_defaults(func=execute)


def usage_error(message: str) -> int:
    print(f"outboxd dead-letters: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def selection(args) -> dict | None:
    """The query parameters of --id / --error / --all, or None when none was given."""
    given = [bool(args.ids), args.error is not None, args.all]
    if not any(given):
        return None
    return {"event_ids": args.ids or None, "error_pattern": args.error, "all": args.all}


def confirmed(count: int) -> bool:
    sys.stderr.write(f"Delete {count} dead letters? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def execute(args, settings) -> int:
    if sum([bool(args.ids), args.error is not None, args.all]) > 1:
        return usage_error("choose one selection: --id N (repeatable), --error PATTERN or --all")
    if args.error is not None and not args.error.strip():
        return usage_error("--error needs a non-empty PATTERN (use --all for every dead letter)")
    selected = selection(args)
    if args.action != "list" and selected is None:
        return usage_error(
            f"{args.action} needs a selection: --id N (repeatable), --error PATTERN or --all"
        )
    if args.yes and args.action != "purge":
        return usage_error("--yes is for purge")

    with connect(settings) as conn:
        if args.action == "list":
            rows = conn.execute(query("dead_letters")).fetchall()
            if selected is not None:
                keep = {r["id"] for r in conn.execute(query("select_dead_letters"), selected)}
                rows = [r for r in rows if r["id"] in keep]
            if args.json:
                print_json(rows)
            else:
                print_table(rows, COLUMNS, title=f"{len(rows)} dead letter(s)")
            return EXIT_OK

        if args.action == "retry":
            done = [r["id"] for r in conn.execute(query("retry_dead_letters"), selected).fetchall()]
            report(args, "retried", done, f"{len(done)} dead letter(s) back to pending")
            return EXIT_OK

        # purge: confirm the count of exactly the rows that will go
        ids = [r["id"] for r in conn.execute(query("select_dead_letters"), selected).fetchall()]
        if not args.yes:
            if not sys.stdin.isatty():
                return usage_error(
                    f"purge would delete {len(ids)} dead letter(s); not asking without a terminal: add --yes"
                )
            if ids and not confirmed(len(ids)):
                print("nothing deleted")
                return EXIT_OK
        done = [r["id"] for r in conn.execute(query("purge_dead_letters"), {"event_ids": ids}).fetchall()] if ids else []
        report(args, "deleted", done, f"{len(done)} dead letter(s) deleted")
        return EXIT_OK


def report(args, verb: str, done: list[int], sentence: str) -> None:
    if args.json:
        print_json({verb: len(done), "ids": done})
    else:
        print(sentence)
    missing = sorted(set(args.ids or ()) - set(done))
    if missing:
        print(f"outboxd dead-letters: not a dead letter: {', '.join(map(str, missing))}", file=sys.stderr)
