"""`outboxd roles`: the least-privilege group roles, printed for review or applied.

The SQL lives in db/sql/roles.sql with placeholders for the two role names,
which are filled in with psycopg.sql (quoted identifiers and literals), never
by string concatenation. Applying is idempotent: run it again after a migration
or an upgrade of outboxd.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import psycopg
from psycopg import sql

from daemon.commands.common import resolve_dsn
from daemon.errors import EXIT_OK, OutboxdError, SchemaNotReadyError, ServiceUnavailableError, describe

ROLES_FILE = Path(__file__).resolve().parents[2] / "db" / "sql" / "roles.sql"
DEFAULT_WRITER = "outboxd_writer"
DEFAULT_WORKER = "outboxd_worker"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _role_name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain role name (letters, digits and _, not starting with a digit, at most 63)"
        )
    return text


def render(writer: str = DEFAULT_WRITER, worker: str = DEFAULT_WORKER) -> sql.Composed:
    if writer == worker:
        raise ValueError("the writer and the worker role must differ")
    return sql.SQL(ROLES_FILE.read_text(encoding="utf-8")).format(
        writer=sql.Identifier(writer),
        worker=sql.Identifier(worker),
        writer_name=sql.Literal(writer),
        worker_name=sql.Literal(worker),
    )


def apply(dsn: str, writer: str = DEFAULT_WRITER, worker: str = DEFAULT_WORKER) -> None:
    """Create the roles if missing and (re)grant, in one transaction."""
    with psycopg.connect(dsn, application_name="outboxd:cli") as conn:
        conn.execute(render(writer, worker))


def next_steps(writer: str, worker: str) -> str:
    return (
        "-- Next: make your logins members of the groups, e.g.\n"
        f"--   GRANT {sql.Identifier(writer).as_string()} TO app_login;      -- the application\n"
        f"--   GRANT {sql.Identifier(worker).as_string()} TO outboxd_login;  -- outboxd run / status / reconcile ...\n"
        "-- Run `outboxd migrate` as the owner of the schema, not as either of these roles.\n"
    )


def register(sub, parents) -> None:
    p = sub.add_parser(
        "roles",
        parents=parents,
        help="print (default) or apply the least-privilege SQL roles: an application writer and the worker",
        description="Print (default) or apply the SQL that creates, if missing, two NOLOGIN group roles and "
        "grants them what they need: the writer writes sources, documents, chunks and crawl_jobs but cannot "
        "touch the outbox; the worker reads content and claims/acknowledges outbox events but cannot modify "
        "content. Then GRANT the groups to your login roles. --apply needs a role that may create roles and "
        "grant on the tables (the schema owner).",
    )
    p.add_argument("--print", dest="print_sql", action="store_true", help="print the SQL (the default)")
    p.add_argument("--apply", action="store_true", help="run the SQL on DATABASE_URL (idempotent)")
    p.add_argument("--writer", type=_role_name, default=DEFAULT_WRITER, metavar="NAME",
                   help=f"name of the application writer role (default: {DEFAULT_WRITER})")
    p.add_argument("--worker", type=_role_name, default=DEFAULT_WORKER, metavar="NAME",
                   help=f"name of the outboxd worker role (default: {DEFAULT_WORKER})")
    p.set_defaults(func=execute)


def execute(args, settings) -> int:
    if args.writer == args.worker:
        print("outboxd roles: --writer and --worker must name different roles", file=sys.stderr)
        return 2
    statement = render(args.writer, args.worker)
    if args.print_sql or not args.apply:
        print(statement.as_string().rstrip() + "\n")
        print(next_steps(args.writer, args.worker), end="")
    if args.apply:
        dsn = resolve_dsn(settings)
        try:
            apply(dsn, args.writer, args.worker)
        except psycopg.OperationalError as exc:
            raise ServiceUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaNotReadyError(f"run `outboxd migrate` first ({describe(exc)})") from exc
        except psycopg.Error as exc:  # e.g. InsufficientPrivilege: not the schema owner, no CREATEROLE
            raise OutboxdError(f"could not apply the roles: {describe(exc)}") from exc
        out = sys.stderr if args.print_sql else sys.stdout
        print(f"outboxd roles: applied; roles {args.writer} and {args.worker} are ready.", file=out)
        if not args.print_sql:
            print(next_steps(args.writer, args.worker), end="", file=out)
    return EXIT_OK
