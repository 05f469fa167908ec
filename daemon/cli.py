"""`outboxd`: the one console script.

Every setting of daemon.config.Settings is a flag of every command (and an
environment variable); flags win over the environment.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from daemon.commands import (
    backfill,
    consume,
    dead_letters,
    demo,
    migrate,
    reconcile,
    reindex,
    relay,
    roles,
    run,
    search,
    status,
    tail,
)
from daemon.config import Settings
from daemon.errors import EXIT_CONFIG, EXIT_FAILURE, OutboxdError
from daemon.logs import setup_logging

COMMANDS = [demo, run, relay, consume, tail, migrate, status, reconcile, backfill, dead_letters, reindex, search, roles]

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
    for module in COMMANDS:
        module.register(sub, [flags])
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
