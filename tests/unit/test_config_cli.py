"""Settings and the CLI: settings come from the environment, .env and a TOML
config file (in that order of precedence, below a command's own flags);
secrets never are options and stay hidden; bad values exit 78 naming the
variable; a mistyped name is warned about (exit 78 with --strict); booleans
are flags; `outboxd --help` stays light (no pydantic, psycopg, qdrant_client,
numpy or torch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from pydantic import ValidationError

from daemon import cli
from daemon.commands.options import load_settings
from daemon.config import Settings, env_name
from daemon.errors import EXIT_CONFIG, EXIT_USAGE
from tests.conftest import REPO

UNPREFIXED = ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SASL_PASSWORD",
              "EMBEDDING_API_KEY")
HEAVY = ("pydantic", "pydantic_settings", "psycopg", "psycopg_pool", "qdrant_client", "numpy", "torch",
         "sentence_transformers", "aiokafka", "sqlalchemy", "rich")
SECRETS = ("database_url", "qdrant_api_key", "sasl_password", "embedding_api_key")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No stray variables from the test environment, and no .env file in the working directory."""
    for key in list(os.environ):
        if key.startswith("OUTBOXD_") or key in UNPREFIXED or key.endswith("_FILE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OUTBOXD_LOG_FORMAT", "text")
    monkeypatch.chdir(tmp_path)


def commands() -> dict[str, click.Command]:
    ctx = click.Context(cli.cli)
    return {name: cli.cli.get_command(ctx, name) for name in cli.COMMANDS}


def context(name: str) -> click.Context:
    """A command's context under the group's, as `outboxd NAME` makes it (click caches
    a command's help option: one made without the group's -h would stay so)."""
    return click.Context(commands()[name], info_name=name, parent=click.Context(cli.cli, **cli.cli.context_settings))


def options(command: click.Command) -> dict[str, click.Option]:
    return {opt: p for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}


# --- the sources ------------------------------------------------------------------------
def test_settings_read_conventional_and_prefixed_env_vars(monkeypatch):
    """DATABASE_URL, QDRANT_URL, QDRANT_API_KEY (unprefixed) and OUTBOXD_* configure Settings."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pw@db.example/app")
    monkeypatch.setenv("QDRANT_URL", "http://qdrant.example:6333")
    monkeypatch.setenv("QDRANT_API_KEY", "qdrant-key")
    monkeypatch.setenv("OUTBOXD_BATCH_SIZE", "128")
    monkeypatch.setenv("OUTBOXD_LEASE_SECONDS", "12.5")
    monkeypatch.setenv("OUTBOXD_COLLECTION", "docs")
    monkeypatch.setenv("OUTBOXD_WORKER_NAME", "worker-7")
    monkeypatch.setenv("OUTBOXD_LOG_LEVEL", "debug")

    s = Settings()
    assert s.database_url.get_secret_value() == "postgresql://app:pw@db.example/app"
    assert s.qdrant.url == "http://qdrant.example:6333"
    assert s.qdrant.api_key.get_secret_value() == "qdrant-key"
    assert (s.batch_size, s.lease_seconds, s.collection, s.log_level) == (128, 12.5, "docs", "DEBUG")
    assert s.application_name == "outboxd:worker-7"


def test_prefixed_names_work_for_conventional_variables_too(monkeypatch):
    """OUTBOXD_DATABASE_URL / OUTBOXD_QDRANT__URL are accepted as well."""
    monkeypatch.setenv("OUTBOXD_DATABASE_URL", "postgresql://other/db")
    monkeypatch.setenv("OUTBOXD_QDRANT__URL", "http://other:6333")
    s = Settings()
    assert s.database_url.get_secret_value() == "postgresql://other/db"
    assert s.qdrant.url == "http://other:6333"


def test_dotenv_file_is_read_and_environment_wins(monkeypatch, tmp_path):
    """A .env file in the working directory sets values; real environment variables override it."""
    (tmp_path / ".env").write_text("OUTBOXD_BATCH_SIZE=11\nOUTBOXD_MAX_ATTEMPTS=9\n")
    monkeypatch.setenv("OUTBOXD_MAX_ATTEMPTS", "3")
    s = Settings()
    assert (s.batch_size, s.max_attempts) == (11, 3)


def test_env_names_are_the_documented_ones():
    """Conventional names stay unprefixed; every other setting is OUTBOXD_<NAME>."""
    assert env_name("database_url") == "DATABASE_URL"
    assert env_name("qdrant.url") == "QDRANT_URL"
    assert env_name("qdrant.api_key") == "QDRANT_API_KEY"
    assert env_name("qdrant.timeout") == "OUTBOXD_QDRANT__TIMEOUT"
    assert env_name("embedding.api_key") == "EMBEDDING_API_KEY"
    assert env_name("embedding.batch_size") == "OUTBOXD_EMBEDDING__BATCH_SIZE"
    assert env_name("batch_size") == "OUTBOXD_BATCH_SIZE"
    assert env_name("retry_backoff_max") == "OUTBOXD_RETRY_BACKOFF_MAX"
    assert env_name("health.port") == "OUTBOXD_HEALTH__PORT"  # a table's: OUTBOXD_<TABLE>__<NAME>


def test_precedence_flag_environment_dotenv_config_default(monkeypatch, tmp_path):
    """A command's flag beats the environment, which beats .env, which beats the
    config file, which beats the default."""
    config = tmp_path / "outboxd.toml"
    config.write_text('batch_size = 1\nmax_attempts = 2\npoll_interval = 3.0\ndata_dir = "/from/config"\n'
                      '[embedding]\nbackend = "sentence-transformers"\nprecision = "fp32"\n')
    (tmp_path / ".env").write_text("OUTBOXD_MAX_ATTEMPTS=7\nOUTBOXD_POLL_INTERVAL=8\n")
    monkeypatch.setenv("OUTBOXD_POLL_INTERVAL", "9")
    monkeypatch.setenv("OUTBOXD_DATA_DIR", "/from/env")

    s, problems = load_settings(config, {"data_dir": Path("/from/flag")}, strict=False)
    assert problems == []
    assert (s.batch_size, s.max_attempts, s.poll_interval, s.data_dir) == (1, 7, 9.0, Path("/from/flag"))
    assert s.embedding.precision == "fp32"
    assert s.lease_seconds == Settings.model_fields["lease_seconds"].default
    assert Settings().batch_size == Settings.model_fields["batch_size"].default, "the config file is read only while load_settings builds the settings"


def test_config_file_through_the_cli(monkeypatch, tmp_path, capsys):
    """--config FILE (or OUTBOXD_CONFIG) feeds the settings; a broken file exits 78 naming it."""
    good = tmp_path / "good.toml"
    good.write_text('collection = "from_config"\nbatch_size = 0\n')
    assert cli.main(["roles", "--config", str(good)]) == EXIT_CONFIG  # batch_size = 0 is invalid: it was read
    assert f"batch_size in {good}" in capsys.readouterr().err  # named as the file names it

    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3\n")
    monkeypatch.setenv("OUTBOXD_CONFIG", str(bad))
    assert cli.main(["roles"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid TOML" in err
    assert cli.main(["roles", "--config", str(tmp_path / "missing.toml")]) == EXIT_CONFIG
    assert "missing.toml" in capsys.readouterr().err


def test_a_secret_in_the_config_file_is_refused(tmp_path, capsys):
    """Config files get copied and committed: a secret there exits 78, naming the
    key and where secrets go, and never echoing the value."""
    config = tmp_path / "outboxd.toml"
    config.write_text('database_url = "postgresql://app:Hunter2pw@db/app"\nbatch_size = 8\n')
    assert cli.main(["roles", "--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "database_url" in err and "_FILE" in err and "Hunter2pw" not in err


# --- the Qdrant choice -------------------------------------------------------------------
def test_an_explicit_qdrant_path_beats_qdrant_url_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QDRANT_URL", "http://from-env:6333")
    s, _ = load_settings(None, {"qdrant_path": tmp_path / "q"}, strict=False)
    assert (s.qdrant.url, s.qdrant.path) == (None, tmp_path / "q")
    monkeypatch.delenv("QDRANT_URL")
    monkeypatch.setenv("OUTBOXD_QDRANT__PATH", str(tmp_path / "env-q"))
    s, _ = load_settings(None, {"qdrant_url": "http://from-flag:6333"}, strict=False)
    assert (s.qdrant.url, s.qdrant.path) == ("http://from-flag:6333", None)
    monkeypatch.setenv("OUTBOXD_QDRANT__TIMEOUT", "5")  # the rest of the table is still read
    s, _ = load_settings(None, {"qdrant_url": "http://from-flag:6333"}, strict=False)
    assert (s.qdrant.url, s.qdrant.path, s.qdrant.timeout) == ("http://from-flag:6333", None, 5.0)
    for name in ("run", "status", "reconcile", "search", "reindex", "consume"):
        assert {"--qdrant-path", "--qdrant-url"} <= set(options(commands()[name])), name


def test_qdrant_url_and_path_both_in_the_environment_exit_78(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QDRANT_URL", "http://from-env:6333")
    monkeypatch.setenv("OUTBOXD_QDRANT__PATH", str(tmp_path / "q"))
    assert cli.main(["roles"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "QDRANT_URL" in err and "OUTBOXD_QDRANT__PATH" in err


# --- secrets ------------------------------------------------------------------------------
def test_no_command_has_a_secret_option():
    """Secrets come from the environment or a *_FILE, never the command line (ps, shell history)."""
    forbidden = {"--" + name.replace("_", "-") for name in SECRETS}
    for name, command in commands().items():
        opts = set(options(command))
        assert not opts & forbidden, f"{name}: {sorted(opts & forbidden)}"
        assert not [o for o in opts if any(w in o for w in ("password", "api-key", "secret", "token"))], name


def test_secrets_never_show_in_repr_or_str():
    """SecretStr settings (database URL with password, Qdrant API key) are masked when printed."""
    s = Settings(database_url="postgresql://app:hunter2@db.example/app", qdrant={"api_key": "s3cr3t-api-key"})
    for text in (repr(s), str(s)):
        assert "hunter2" not in text
        assert "s3cr3t-api-key" not in text
    assert s.database_url.get_secret_value().endswith("hunter2@db.example/app")


# --- options ------------------------------------------------------------------------------
def test_booleans_are_flags():
    """No option takes a true/false value (`--normalize NORMALIZE` is gone): each is --x or --x/--no-x."""
    for name, command in commands().items():
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.types.BoolParamType):
                assert param.is_flag, f"{name} {param.opts}"
    reindex = options(commands()["reindex"])
    assert reindex["--normalize"] is reindex["--no-normalize"]
    assert options(commands()["run"])["--strict"] is options(commands()["run"])["--no-strict"]


def test_each_command_has_only_its_own_options_and_the_common_ones():
    """`outboxd search --help` no longer lists every setting."""
    common = {"--config", "--data-dir", "--log-level", "--strict", "--no-strict"}
    run = set(options(commands()["run"]))
    assert run == common | {"--drain", "--qdrant-url", "--qdrant-path"}
    for name, command in commands().items():
        assert "--batch-size" not in options(command) and "--collection" not in options(command), name
        assert len(command.get_help(context(name)).splitlines()) < 60, name


def test_invalid_value_exits_78_naming_the_env_var(monkeypatch, capsys):
    """A bad value exits EX_CONFIG (78) with a one-line message naming the environment variable."""
    monkeypatch.setenv("OUTBOXD_BATCH_SIZE", "0")
    assert cli.main(["run"]) == EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert "OUTBOXD_BATCH_SIZE" in err and "invalid settings" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.delenv("OUTBOXD_BATCH_SIZE")
    monkeypatch.setenv("OUTBOXD_LEASE_SECONDS", "not-a-number")
    assert cli.main(["dead-letters", "list"]) == EXIT_CONFIG
    assert "OUTBOXD_LEASE_SECONDS" in capsys.readouterr().err


def test_pool_min_size_above_max_size_is_a_config_error():
    """pool_min_size > pool_max_size is rejected as a setting, not discovered later as a crash."""
    with pytest.raises(ValidationError):
        Settings(pool_min_size=5, pool_max_size=2)


@pytest.mark.parametrize("argv, says", [
    (["status", "--max-lag", "-1"], "-1"),
    (["status", "--batch-size", "5"], "No such option"),
    (["tail", "--document", "not-a-uuid"], "is not a valid UUID"),
    (["reconcile", "--source", "1234"], "is not a valid UUID"),
    (["search"], "Missing argument"),
    (["no-such-command"], "No such command"),
    (["dead-letters", "retry"], "needs a selection"),  # found by the command itself, after the settings
    (["roles", "--writer", "same", "--worker", "same"], "different roles"),
])
def test_usage_errors_exit_2(argv, says, capsys):
    assert cli.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


# --- mistyped names -----------------------------------------------------------------------
def test_an_unknown_variable_is_a_warning_naming_the_closest_setting(monkeypatch, capsys):
    monkeypatch.setenv("OUTBOXD_BATCH_SIZ", "5")
    assert cli.main(["roles"]) == 0
    err = capsys.readouterr().err
    assert "OUTBOXD_BATCH_SIZ" in err and "did you mean OUTBOXD_BATCH_SIZE?" in err


@pytest.mark.parametrize("how", [["--strict"], "OUTBOXD_STRICT"])
def test_strict_refuses_an_unknown_variable(monkeypatch, capsys, how):
    monkeypatch.setenv("OUTBOXD_QDRANT_TIMOUT", "5")
    argv = ["roles"]
    if how == "OUTBOXD_STRICT":
        monkeypatch.setenv("OUTBOXD_STRICT", "1")  # the CLI's own variable: never itself "unknown"
    else:
        argv += how
    assert cli.main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "OUTBOXD_QDRANT_TIMOUT" in err and "did you mean OUTBOXD_QDRANT__TIMEOUT?" in err


def test_an_unknown_config_key_is_a_warning_and_strict_refuses_it(tmp_path, capsys):
    config = tmp_path / "outboxd.toml"
    config.write_text('batch_sise = 3\n[embedding]\nbackend = "onnx"\n')
    assert cli.main(["roles", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "'batch_sise'" in err and "did you mean batch_size?" in err
    assert cli.main(["roles", "--config", str(config), "--strict"]) == EXIT_CONFIG
    assert "batch_sise" in capsys.readouterr().err
    # a backend's own table refuses what it does not know (a typo there would change nothing silently)
    config.write_text('[embedding]\nbackend = "onnx"\nquantise = true\n')
    assert cli.main(["roles", "--config", str(config)]) == EXIT_CONFIG
    assert "quantise" in capsys.readouterr().err
    assert cli.main(["roles", "--config", str(config), "--strict"]) == EXIT_CONFIG
    assert "did you mean quantize?" in capsys.readouterr().err


def test_an_unknown_dotenv_entry_is_a_warning(tmp_path, capsys):
    (tmp_path / ".env").write_text("OUTBOXD_COLECTION=docs\n")
    assert cli.main(["roles"]) == 0
    assert "OUTBOXD_COLECTION" in (err := capsys.readouterr().err) and "OUTBOXD_COLLECTION" in err


# --- help, laziness and completion --------------------------------------------------------
def test_run_help_shows_its_options_and_where_settings_come_from(capsys):
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--drain" in out and "DATABASE_URL" in out and "--config" in out
    assert "--batch-size" not in out


def test_top_level_help_lists_every_command_and_mentions_database_url(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in cli.COMMANDS)
    assert "DATABASE_URL" in out and ".env" in out


IMPORTS = """
import json, sys
from daemon import cli
code = cli.main(sys.argv[1:])
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["consume", "--help"], ["completion", "bash"]])
def test_help_imports_nothing_heavy(argv, tmp_path):
    """`outboxd --help` and `outboxd status --help` load neither pydantic, psycopg,
    qdrant_client, numpy nor torch (a real process: nothing loaded by other tests)."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS.format(heavy=HEAVY), *argv], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, result.stderr


def test_every_command_module_is_light_at_import(tmp_path):
    """Each command module imports only click and daemon.commands.options at module level."""
    script = (
        "import json, sys, importlib\nfrom daemon.cli import COMMANDS\n"
        "for target, _ in COMMANDS.values(): importlib.import_module(target.partition(':')[0])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script(shell, capsys):
    assert cli.main(["completion", shell]) == 0
    assert "_OUTBOXD_COMPLETE" in capsys.readouterr().out


def test_completion_completes_commands_and_options(monkeypatch, capsys):
    """What the bash script asks for: the commands for `outboxd st<TAB>`, a command's options."""
    monkeypatch.setenv("_OUTBOXD_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", "outboxd st")
    monkeypatch.setenv("COMP_CWORD", "1")
    with pytest.raises(SystemExit):
        cli.cli.main(args=[], prog_name="outboxd")
    assert "plain,status" in capsys.readouterr().out
    monkeypatch.setenv("COMP_WORDS", "outboxd status --max")
    monkeypatch.setenv("COMP_CWORD", "2")
    with pytest.raises(SystemExit):
        cli.cli.main(args=[], prog_name="outboxd")
    out = capsys.readouterr().out
    assert "--max-lag" in out and "--max-dead-letters" in out
