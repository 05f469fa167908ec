"""`outboxd`: the one console script.

Every setting of daemon.config.Settings is a flag of every command (and an
environment variable); flags win over the environment.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import orjson
from pydantic import ValidationError

from daemon.config import Settings
from daemon.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, OutboxdError
from daemon.logs import setup_logging

log = logging.getLogger("outboxd")


# --- settings as flags ------------------------------------------------------------
def env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    if alias is not None:
        return alias.choices[0]
    return f"OUTBOXD_{name.upper()}"


def _settings_flags() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (each also an environment variable)")
    for name, field in Settings.model_fields.items():
        default = "" if field.default_factory or field.default is None else f" (default: {field.default})"
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"setting__{name}",
            default=argparse.SUPPRESS,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description}{default} [env: {env_name(name)}]",
        )
    return parent


def describe_validation(exc: ValidationError) -> str:
    """Name each bad setting the way the operator sets it: its environment variable."""
    problems = []
    for e in exc.errors():
        field = e["loc"][0] if e["loc"] else None
        where = f"{env_name(field)}: " if field in Settings.model_fields else ""
        problems.append(f"{where}{e['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {k.removeprefix("setting__"): v for k, v in vars(args).items() if k.startswith("setting__")}
    return Settings(**overrides)


def resolve_dsn(settings: Settings) -> str:
    """DATABASE_URL, or the embedded PostgreSQL (migrated, and its URL printed)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from db import migrate
    from db.embedded import start_embedded_postgres

    dsn = start_embedded_postgres(settings.data_dir.resolve())
    migrate.upgrade(dsn)
    print(f"outboxd: embedded PostgreSQL is ready; write your chunks to DATABASE_URL={dsn}", flush=True)
    return dsn


# --- commands ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.supervisor import run_daemon

    dsn = resolve_dsn(settings)
    return asyncio.run(run_daemon(settings, dsn, drain=args.drain))


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from db import migrate

    if settings.database_url is None:
        resolve_dsn(settings)  # the embedded database migrates as it starts
        return EXIT_OK
    dsn = settings.database_url.get_secret_value()
    if args.downgrade:
        migrate.downgrade(dsn, args.downgrade)
    else:
        migrate.upgrade(dsn)
    log.info("schema migrated", extra={"revision": migrate.current_revision(dsn)})
    return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    from psycopg.rows import dict_row

    from db.queries import query

    dsn = resolve_dsn(settings)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row, application_name="outboxd:cli") as conn:
        if args.action == "list":
            rows = conn.execute(query("dead_letters")).fetchall()
            _print_rows(rows, args.json, ["id", "chunk_id", "op", "attempts", "last_failed_at", "last_error"])
        else:
            ids = args.id or None
            rows = conn.execute(query("retry_dead_letters"), {"event_ids": ids}).fetchall()
            print(f"{len(rows)} dead letter(s) back to pending")
    return EXIT_OK


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    flags = _settings_flags()
    parser = argparse.ArgumentParser(
        prog="outboxd",
        description="Keep a Qdrant collection of chunk embeddings converged with PostgreSQL.",
        epilog="PostgreSQL comes from DATABASE_URL; without it, commands start an embedded PostgreSQL "
        "under --data-dir. Qdrant comes from QDRANT_URL; without it, qdrant-client's local mode. "
        "`outboxd COMMAND --help` lists every setting.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[flags],
        help="run the daemon until SIGTERM/SIGINT",
        description="Run the daemon. Without DATABASE_URL it starts an embedded PostgreSQL and prints its URL.",
    )
    run.add_argument("--drain", action="store_true", help="exit 0 once no event is pending (dead letters aside)")
    run.set_defaults(func=cmd_run)

    mig = sub.add_parser("migrate", parents=[flags], help="upgrade the database schema to head (idempotent)")
    mig.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead ('base' removes all)")
    mig.set_defaults(func=cmd_migrate)

    dl = sub.add_parser("dead-letters", parents=[flags], help="list or retry events that kept failing")
    dl.add_argument("action", choices=["list", "retry"])
    dl.add_argument("--id", type=int, action="append", help="retry only this event id (repeatable)")
    dl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dl.set_defaults(func=cmd_dead_letters)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print(f"outboxd: invalid settings: {describe_validation(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    try:
        return args.func(args, settings)
    except OutboxdError as exc:
        log.error(str(exc), extra={"exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: say so plainly, with the traceback
        log.exception("unexpected error", extra={"error": type(exc).__name__})
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
