"""`outboxd`: the one console script.

The CLI is the composition root: it finds each command by name in COMMANDS and
imports its module only when that command runs or its --help is asked, so
`outboxd --help` loads neither torch nor pydantic, and the Kafka wing
(consumers/) plugs its commands in without the core importing it.

Settings come from the environment, .env and an optional --config FILE; each
command has its own options plus a few common ones (daemon.commands.options).
Exit codes: daemon.errors (one contract for every command). The process ends
in end_process(), never in the interpreter's teardown.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import signal
import sys
import traceback
from contextlib import suppress
from typing import NoReturn

import click

from daemon.commands.options import ended_by_reader, reader_gone
from db.embedded import release_embedded_postgres

# name -> (module:attribute of the click command, one line for `outboxd --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("daemon.commands.demo:command", "the whole loop on the embedded defaults, with a sample corpus"),
    "run": ("daemon.commands.run:command", "run the daemon (notify transport) until SIGTERM/SIGINT"),
    "relay": ("consumers.commands:relay", "Kafka transport: publish outbox events to the topic"),
    "consume": ("consumers.commands:consume", "Kafka transport: apply chunk events from the topic to Qdrant"),
    "tail": ("consumers.commands:tail", "print chunk events from the Kafka topic as they arrive"),
    "migrate": ("daemon.commands.migrate:command", "upgrade the database schema (idempotent); capture mode"),
    "status": ("daemon.commands.status:command", "backlog, lag, leases, dead letters, catalog and the live collection"),
    "reconcile": ("daemon.commands.reconcile:command", "compare every chunk with every point; report or repair drift"),
    "backfill": ("daemon.commands.backfill:command", "enqueue existing chunks (resumable)"),
    "dead-letters": ("daemon.commands.dead_letters:command", "list, retry or purge events that kept failing"),
    "reindex": ("daemon.commands.reindex:command", "move the collection to another model without downtime"),
    "collection": ("daemon.commands.collection:command",
                   "the collection's shards, replicas, HNSW, quantization and indexes beside the settings"),
    "search": ("daemon.commands.search:command", "hybrid search: Qdrant vectors + PostgreSQL full text"),
    "roles": ("daemon.commands.roles:command", "create the least-privilege writer and worker roles"),
    "completion": ("daemon.commands.completion:command", "print a shell completion script (bash, zsh, fish)"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attribute = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """A mistyped command (`outboxd stauts`) is a usage error naming the closest one."""
        name = args[0] if args else ""
        if name not in COMMANDS and not name.startswith("-") and not ctx.resilient_parsing:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            if close:
                ctx.fail(f"No such command {name!r}. Did you mean {close[0]!r}?")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_line) for name, (_, help_line) in COMMANDS.items()])


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Settings come from the environment (OUTBOXD_*, DATABASE_URL, QDRANT_URL, ...), a .env file and "
    "`--config FILE` (TOML); secrets only from the environment or a *_FILE. Without DATABASE_URL, commands "
    "start an embedded PostgreSQL under --data-dir; without QDRANT_URL, Qdrant's local mode. "
    "`outboxd COMMAND --help` shows a command's options.",
)
@click.version_option(package_name="outboxd", prog_name="outboxd")
def cli() -> None:
    """Keep a Qdrant collection of chunk embeddings converged with PostgreSQL."""


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (daemon.errors: 0, 1, 2, 3, 69, 78, 130)."""
    # gRPC's C core (Qdrant over gRPC) logs at INFO to stderr, unstructured, e.g. on
    # every fork; outboxd says what matters itself. GRPC_VERBOSITY in the environment wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        try:
            code = cli.main(args=argv, prog_name="outboxd", standalone_mode=False)
        except click.exceptions.Exit as done:  # --help, --version
            return done.exit_code
        except click.ClickException as exc:  # usage: an unknown command or option, a bad value
            exc.show()
            return exc.exit_code
        except click.exceptions.Abort:  # Ctrl-C at a prompt
            click.echo("", err=True)
            return 130
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is caught below
        return code if isinstance(code, int) else 0
    except (BrokenPipeError, SystemExit):
        # The reader of our output went away (`outboxd status | head -1`): end quietly,
        # like a Unix filter. A command's own output is caught in run_command (and
        # `tail` stops its stream); this is the last flush, and output click writes
        # itself (--help, completion), where click exits 1 on a closed pipe.
        if not reader_gone():
            raise
        return ended_by_reader()


def program() -> NoReturn:
    """The console script (and `python -m daemon.cli`): main(), then end_process()."""
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling began (while importing it)
        code = 130
    except SystemExit as done:  # one main() does not own: as the interpreter would report it
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if not isinstance(done.code, int | None):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a bug outside run_command's net: its traceback, exit 1
        traceback.print_exc()
        code = 1
    end_process(code)


def end_process(code: int) -> NoReturn:
    """End the process now, with code: the embedded PostgreSQL released (the last
    holder stops it), the logs and output flushed, then os._exit. The interpreter's
    teardown would take seconds once a model is loaded, and native libraries print
    their leak reports in it (nanobind's, from the triton that PyPI's torch brings),
    on every exit; nothing in it is outboxd's to finish (the services have closed
    and flushed their telemetry)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # another Ctrl-C now would only cut the release short
        with suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)
    release_embedded_postgres()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a reader gone (`| head`) was dealt with in main()
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    program()
