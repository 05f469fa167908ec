"""`outboxd dead-letters`: events that kept failing."""
from __future__ import annotations

from daemon.commands.common import connect, print_json, print_table
from daemon.errors import EXIT_OK
from db.queries import query


def register(sub, parents) -> None:
    p = sub.add_parser("dead-letters", parents=parents, help="list or retry events that kept failing")
    p.add_argument("action", choices=["list", "retry"])
    p.add_argument("--id", type=int, action="append", help="retry only this event id (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    with connect(settings) as conn:
        if args.action == "list":
            rows = conn.execute(query("dead_letters")).fetchall()
            if args.json:
                print_json(rows)
            else:
                print_table(rows, ["id", "chunk_id", "op", "attempts", "last_failed_at", "last_error"])
        else:
            rows = conn.execute(query("retry_dead_letters"), {"event_ids": args.id or None}).fetchall()
            print(f"{len(rows)} dead letter(s) back to pending")
    return EXIT_OK
