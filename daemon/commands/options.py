"""What every command shares on the command line: the common options (where
the settings come from, where data lives, how loud to be), how they become
the settings of the class the command names, and one exit-code contract
(daemon.errors) for whatever the command raises.

This module is imported by every command module at `--help` time: it must
stay light (click only; pydantic and the rest are imported when a command runs).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import select
import sys
from pathlib import Path
from typing import Any, Callable

import click

from daemon.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    ConfigError,
    Failure,
    InvalidSettings,
    OutboxdError,
    classify,
    dependency_of,
    describe,
    refusal,
)
from daemon.wings import PLUGINS, WING_SETTINGS, installed

log = logging.getLogger("outboxd")

# OUTBOXD_ variables the CLI itself reads (not settings): never "unknown"
CLI_VARIABLES = {"OUTBOXD_CONFIG", "OUTBOXD_STRICT"}

# what became of the command's output: the exit code it decided before printing
# its result (verdict()), and whether the reader went away (reader_gone())
_output = {"verdict": 0, "reader_gone": False}


def verdict(code: int) -> int:
    """Record the exit code a command has decided before it prints its result
    (`reconcile --check` found drift: 3), so that a reader that goes away
    mid-print (`| head -1`) does not turn it into 0. Returns code."""
    _output["verdict"] = code
    return code


def reader_gone(streams=None) -> bool:
    """Whether the reader of stdout or stderr went away (`outboxd status | head -1`).
    Each such stream is pointed at /dev/null, so nothing more that is written
    (a log line, the interpreter's last flush) meets the broken pipe again. A
    BrokenPipeError that is not about our output (a socket) is not this."""
    for stream in streams or (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            poller = select.poll()
            poller.register(fd, 0)  # POLLERR is always reported: a pipe with no reader left
            if not any(events & select.POLLERR for _, events in poller.poll(0)):
                continue
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
            continue
        _output["reader_gone"] = True
    return _output["reader_gone"]


def ended_by_reader() -> int:
    """The exit code once the reader of our output went away: what the command had
    decided (verdict()), else 0; the command ends quietly, as a Unix filter does
    under `| head`."""
    return _output["verdict"]


# settings a command may take as its own flags (besides the common ones): each flag's
# parameter and the setting it sets; anything given on the command line wins over the environment
FLAG_SETTINGS = {
    "data_dir": "data_dir",
    "log_level": "log_level",
    "qdrant_url": "qdrant.url",
    "qdrant_path": "qdrant.path",
    "model": "embedding.name",
    "max_seq_length": "embedding.max_seq_length",
    "normalize": "embedding.normalize",
}


def settings_options(*, qdrant: bool = False, model: bool = False, settings: str | None = None) -> Callable:
    """Add the common options to a command; its callback then receives a
    built `settings` first, and its return value (or error) becomes the exit code.
    qdrant: --qdrant-url and --qdrant-path (commands that open Qdrant); model:
    --model, --max-seq-length and --normalize/--no-normalize (`reindex`);
    settings: the class the command builds, by name (settings_class), so that
    --help imports nothing of it."""

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(config_file, strict, **kwargs) -> int:
            flags: dict[str, Any] = {}
            for name in FLAG_SETTINGS:
                value = kwargs.pop(name, None)
                if value is not None:  # qdrant_path beats QDRANT_URL from the environment (daemon.config.Settings)
                    flags[name] = value
            return run_command(lambda built: f(built, **kwargs), config_file, flags, strict, settings)

        options = [
            click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                         envvar="OUTBOXD_CONFIG", help="TOML file of settings (below the environment) [env: OUTBOXD_CONFIG]"),
            click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                         help="where the embedded PostgreSQL and Qdrant keep their data [env: OUTBOXD_DATA_DIR]"),
            click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
                         help="[env: OUTBOXD_LOG_LEVEL]"),
            click.option("--strict/--no-strict", default=False, envvar="OUTBOXD_STRICT",
                         help="exit 78 on an unknown OUTBOXD_ variable or config key (default: warn) [env: OUTBOXD_STRICT]"),
        ]
        if qdrant:
            options += [
                click.option("--qdrant-url", metavar="URL", help="Qdrant server; overrides OUTBOXD_QDRANT__PATH [env: QDRANT_URL]"),
                click.option("--qdrant-path", type=click.Path(path_type=Path),
                             help="local-mode folder (':memory:' keeps nothing); overrides QDRANT_URL [env: OUTBOXD_QDRANT__PATH]"),
            ]
        if model:
            options += [
                click.option("--model", metavar="NAME",
                             help="sentence-transformers model name or path [env: OUTBOXD_EMBEDDING__NAME]"),
                click.option("--max-seq-length", type=click.IntRange(min=8), metavar="N",
                             help="tokens the model reads per text [env: OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH]"),
                click.option("--normalize/--no-normalize", default=None,
                             help="unit-length vectors (default: on) [env: OUTBOXD_EMBEDDING__NORMALIZE]"),
            ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


CORE_SETTINGS = "daemon.config:Settings"


def settings_class(name: str | None = None) -> type:
    """The settings class a command builds: the core's (daemon.config.Settings) by
    default; a "module:Class"; or a wing's by its name in daemon.wings.PLUGINS, the
    core's where that wing is not installed (`status` reports Kafka where it can)."""
    if name in PLUGINS:
        return installed(name) or settings_class()
    module, _, attribute = (name or CORE_SETTINGS).partition(":")
    return getattr(importlib.import_module(module), attribute)


def every_settings_class() -> list[type]:
    """The core's settings class and every installed wing's: a variable that one
    of them reads is never "unknown", whichever command reads the environment."""
    return [settings_class(), *filter(None, map(installed, WING_SETTINGS))]


def load_settings(config_file: Path | None, flags: dict[str, Any], strict: bool, settings: str | None = None):
    """Settings of the class named `settings` (settings_class) from the flags (by
    their parameter: {"qdrant_path": ...}), the environment, .env and the config
    file. Returns them with the warnings to log: unknown OUTBOXD_ names (refused
    with strict) and deprecated names. A bad value raises InvalidSettings naming
    where it was set."""
    # pydantic and the settings machinery load when a command runs, not at --help (this module's docstring)
    from pydantic import ValidationError

    from daemon.settings.check import check_names
    from daemon.settings.report import Given, describe_validation
    from daemon.settings.sources import dotenv_entries, environment, read_config, using_config

    cls = settings_class(settings)
    known = every_settings_class()
    config = read_config(config_file, known) if config_file is not None else {}
    environ = {k: v for k, v in environment().items() if k not in CLI_VARIABLES}
    dotenv = dotenv_entries()
    names = check_names(known, environ, dotenv, config, config_file)
    if names.unknown and strict:
        raise ConfigError("; ".join(names.unknown) + " (--strict)")
    values: dict[str, Any] = {}
    for name, value in flags.items():  # into their tables: {"qdrant": {"path": ...}}
        *tables, field = FLAG_SETTINGS[name].split(".")
        inner = values
        for table in tables:
            inner = inner.setdefault(table, {})
        inner[field] = value
    token = using_config(config, config_file)
    try:
        built = cls(**values)
    except ValidationError as exc:
        given = Given({FLAG_SETTINGS[name]: "--" + name.replace("_", "-") for name in flags},
                      environ, dotenv, config, config_file)
        raise InvalidSettings(f"invalid settings: {describe_validation(exc, cls, given)}") from None
    finally:
        token.var.reset(token)
    return built, [f"{problem} (ignored; --strict refuses it)" for problem in names.unknown] + names.deprecated


def run_command(body: Callable[[Any], int | None], config_file, flags, strict, settings: str | None = None) -> int:
    """Build the settings, set up logging, run the command; map what it raises
    to the exit-code contract (daemon.errors). A bad setting is reported before
    anything heavy is imported (daemon.errors imports its clients lazily)."""
    _output.update(verdict=0, reader_gone=False)
    try:
        built, warnings = load_settings(config_file, flags, strict, settings)
    except OutboxdError as exc:  # an invalid setting, a broken config file, --strict
        click.echo(f"outboxd: {exc}", err=True)
        return getattr(exc, "exit_code", EXIT_CONFIG)
    from daemon.logs import setup_logging  # OpenTelemetry's logging: only once the settings are good

    setup_logging(built.log_level, built.log_format)
    for warning in warnings:
        log.warning(warning)
    try:
        code = body(built)
        return 0 if code is None else code
    except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
        raise  # a usage error the command found (exit 2: daemon.cli shows it with the usage line), or a prompt aborted
    except OutboxdError as exc:
        log.error(str(exc), extra={"exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and reader_gone():  # `outboxd status | head -1`
            return ended_by_reader()
        # SQLAlchemy (Alembic, `migrate`) wraps the driver's error, which says what happened
        failures = {classify(e): e for e in (getattr(exc, "orig", None), exc) if e is not None}
        if (refused_by := failures.get(Failure.REFUSAL)) is not None:  # a key or certificate the server refuses
            refused = refusal(refused_by)
            log.error(str(refused), extra={"exit_code": refused.exit_code})
            return refused.exit_code
        if (outage := failures.get(Failure.TRANSIENT)) is not None:  # an outage outside a service's own waiting
            hint = ""
            if dependency_of(outage) == "postgresql" and built.database_url is not None:
                from daemon.commands.common import stale_embedded_hint  # psycopg, pydantic: only on this path

                hint = stale_embedded_hint(built.database_url.get_secret_value())
            log.error(f"{dependency_of(outage)} is unreachable: {describe(outage)}{hint}",
                      extra={"exit_code": EXIT_UNAVAILABLE})
            return EXIT_UNAVAILABLE
        log.exception("unexpected error", extra={"error": type(exc).__name__, "exit_code": EXIT_FAILURE})
        return EXIT_FAILURE


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of tables")(f)
