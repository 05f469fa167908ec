"""`outboxd roles`: the least-privilege group roles, printed for review or applied.

The SQL lives in db/sql/roles.sql with placeholders for the two role names,
which db.roles fills in with psycopg.sql (quoted identifiers and literals),
never by string concatenation. Applying is idempotent: run it again after a migration
or an upgrade of outboxd.
"""
from __future__ import annotations

import re
import sys

import click

from daemon.commands.options import settings_options
from daemon.errors import OutboxdError, SchemaNotReadyError, ServiceUnavailableError, describe, refusal

DEFAULT_WRITER = "outboxd_writer"
DEFAULT_WORKER = "outboxd_worker"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _role_name(ctx, param, text: str) -> str:
    if not _NAME.match(text):
        raise click.BadParameter(
            f"{text!r} is not a plain role name (letters, digits and _, not starting with a digit, at most 63)"
        )
    return text


@click.command(help="Print (default) or apply the SQL that creates, if missing, two NOLOGIN group roles and "
               "grants them what they need: the writer writes sources, documents, chunks and crawl_jobs but "
               "cannot touch the outbox; the worker reads content and claims/acknowledges outbox events but "
               "cannot modify content. Then GRANT the groups to your login roles. --apply needs a role that may "
               "create roles and grant on the tables (the schema owner).")
@click.option("--print", "print_sql", is_flag=True, help="print the SQL (the default)")
@click.option("--apply", is_flag=True, help="run the SQL on DATABASE_URL (idempotent)")
@click.option("--writer", default=DEFAULT_WRITER, show_default=True, metavar="NAME", callback=_role_name,
              help="name of the application writer role")
@click.option("--worker", default=DEFAULT_WORKER, show_default=True, metavar="NAME", callback=_role_name,
              help="name of the outboxd worker role")
@settings_options()
def command(settings, print_sql: bool, apply: bool, writer: str, worker: str) -> int:
    if writer == worker:
        raise click.UsageError("--writer and --worker must name different roles")
    statement = render(writer, worker)
    if print_sql or not apply:
        print(statement.as_string().rstrip() + "\n")
        print(next_steps(writer, worker), end="")
    if apply:
        # the command's work loads when it runs: `--help` and a bad setting's message stay quick
        import psycopg

        from daemon.commands.common import resolve_dsn

        dsn = resolve_dsn(settings)
        try:
            apply_roles(dsn, writer, worker)
        except psycopg.OperationalError as exc:
            if (refused := refusal(exc)) is not None:  # no such database, bad credentials: 78, not an outage
                raise refused from None
            raise ServiceUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaNotReadyError(f"run `outboxd migrate` first ({describe(exc)})") from exc
        except psycopg.Error as exc:  # e.g. InsufficientPrivilege: not the schema owner, no CREATEROLE
            raise OutboxdError(f"could not apply the roles: {describe(exc)}") from exc
        out = sys.stderr if print_sql else sys.stdout
        print(f"outboxd roles: applied; roles {writer} and {worker} are ready.", file=out)
        if not print_sql:
            print(next_steps(writer, worker), end="", file=out)
    return 0


def render(writer: str = DEFAULT_WRITER, worker: str = DEFAULT_WORKER):
    """The roles SQL for these two names (a psycopg.sql.Composed): db.roles."""
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from db.roles import render as render_roles

    return render_roles(writer, worker)


def apply_roles(dsn: str, writer: str = DEFAULT_WRITER, worker: str = DEFAULT_WORKER) -> None:
    """Create the roles if missing and (re)grant, in one transaction: db.roles (the command's one
    bridge to its asynchronous database access)."""
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    import asyncio

    from db.roles import apply_roles as apply_in_db

    asyncio.run(apply_in_db(dsn, writer, worker))


apply = apply_roles  # the name tests and scripts have used


def next_steps(writer: str, worker: str) -> str:
    # the command's work loads when it runs: `--help` and a bad setting's message stay quick
    from psycopg import sql

    return (
        "-- Next: make your logins members of the groups, e.g.\n"
        f"--   GRANT {sql.Identifier(writer).as_string()} TO app_login;      -- the application\n"
        f"--   GRANT {sql.Identifier(worker).as_string()} TO outboxd_login;  -- outboxd run / status / reconcile ...\n"
        "-- Run `outboxd migrate` as the owner of the schema, not as either of these roles.\n"
    )
