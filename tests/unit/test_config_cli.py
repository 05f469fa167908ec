"""Settings and the CLI: every setting is an environment variable and a flag,
flags win, secrets stay hidden, bad values exit 78 naming the variable."""
from __future__ import annotations

import argparse
import os

import pytest
from pydantic import ValidationError

from daemon import cli
from daemon.config import Settings
from daemon.errors import EXIT_CONFIG

UNPREFIXED = ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No stray variables from the test environment, and no .env file in the working directory."""
    for key in list(os.environ):
        if key.startswith("OUTBOXD_") or key in UNPREFIXED:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


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
    assert s.qdrant_url == "http://qdrant.example:6333"
    assert s.qdrant_api_key.get_secret_value() == "qdrant-key"
    assert (s.batch_size, s.lease_seconds, s.collection, s.log_level) == (128, 12.5, "docs", "DEBUG")
    assert s.application_name == "outboxd:worker-7"


def test_prefixed_names_work_for_conventional_variables_too(monkeypatch):
    """OUTBOXD_DATABASE_URL / OUTBOXD_QDRANT_URL are accepted as well."""
    monkeypatch.setenv("OUTBOXD_DATABASE_URL", "postgresql://other/db")
    monkeypatch.setenv("OUTBOXD_QDRANT_URL", "http://other:6333")
    s = Settings()
    assert s.database_url.get_secret_value() == "postgresql://other/db"
    assert s.qdrant_url == "http://other:6333"


def test_dotenv_file_is_read_and_environment_wins(monkeypatch, tmp_path):
    """A .env file in the working directory sets values; real environment variables override it."""
    (tmp_path / ".env").write_text("OUTBOXD_BATCH_SIZE=11\nOUTBOXD_MAX_ATTEMPTS=9\n")
    monkeypatch.setenv("OUTBOXD_MAX_ATTEMPTS", "3")
    s = Settings()
    assert (s.batch_size, s.max_attempts) == (11, 3)


def test_every_setting_is_a_flag_of_every_command_with_description_and_env_name():
    """Each Settings field has --<name> on run (and migrate, dead-letters), with its description and env var."""
    for command in ("run", "migrate", "dead-letters"):
        options = {opt: action for action in subparser(command)._actions for opt in action.option_strings}
        for name, field in Settings.model_fields.items():
            assert field.description, f"Settings.{name} has no description"
            flag = "--" + name.replace("_", "-")
            assert flag in options, f"{command} lacks {flag}"
            help_text = options[flag].help
            assert field.description in help_text
            assert f"[env: {cli.env_name(name)}]" in help_text


def test_env_names_are_the_documented_ones():
    """Conventional names stay unprefixed; every other setting is OUTBOXD_<NAME>."""
    assert cli.env_name("database_url") == "DATABASE_URL"
    assert cli.env_name("qdrant_url") == "QDRANT_URL"
    assert cli.env_name("qdrant_api_key") == "QDRANT_API_KEY"
    assert cli.env_name("batch_size") == "OUTBOXD_BATCH_SIZE"
    assert cli.env_name("retry_backoff_max") == "OUTBOXD_RETRY_BACKOFF_MAX"


def test_flags_override_environment(monkeypatch):
    """A CLI flag wins over the environment variable of the same setting; unflagged ones come from env."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://from-env/db")
    monkeypatch.setenv("QDRANT_URL", "http://from-env:6333")
    monkeypatch.setenv("OUTBOXD_BATCH_SIZE", "5")
    monkeypatch.setenv("OUTBOXD_MAX_ATTEMPTS", "7")

    args = cli.build_parser().parse_args(
        ["run", "--database-url", "postgresql://from-flag/db", "--qdrant-url", "http://from-flag:6333", "--batch-size", "9"]
    )
    s = cli.load_settings(args)
    assert s.database_url.get_secret_value() == "postgresql://from-flag/db"
    assert s.qdrant_url == "http://from-flag:6333"
    assert s.batch_size == 9
    assert s.max_attempts == 7


def test_secrets_never_show_in_repr_or_str():
    """SecretStr settings (database URL with password, Qdrant API key) are masked when printed."""
    s = Settings(database_url="postgresql://app:hunter2@db.example/app", qdrant_api_key="s3cr3t-api-key")
    for text in (repr(s), str(s)):
        assert "hunter2" not in text
        assert "s3cr3t-api-key" not in text
    assert s.database_url.get_secret_value().endswith("hunter2@db.example/app")


def test_pool_min_size_above_max_size_is_a_config_error():
    """pool_min_size > pool_max_size is rejected as a setting, not discovered later as a crash."""
    with pytest.raises(ValidationError):
        Settings(pool_min_size=5, pool_max_size=2)


def test_invalid_flag_value_exits_78_naming_the_env_var(capsys):
    """A bad value exits EX_CONFIG (78) with a one-line message naming the environment variable."""
    assert cli.main(["run", "--batch-size", "0"]) == EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert "OUTBOXD_BATCH_SIZE" in err
    assert "invalid settings" in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_env_value_exits_78_naming_the_env_var(monkeypatch, capsys):
    """The same holds when the bad value comes from the environment."""
    monkeypatch.setenv("OUTBOXD_LEASE_SECONDS", "not-a-number")
    assert cli.main(["dead-letters", "list"]) == EXIT_CONFIG
    assert "OUTBOXD_LEASE_SECONDS" in capsys.readouterr().err


def test_run_help_works_and_mentions_database_url(capsys):
    """`outboxd run --help` exits 0 and tells how to point at the database, listing env names."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "DATABASE_URL" in out
    assert "OUTBOXD_BATCH_SIZE" in out and "--drain" in out


def test_top_level_help_works_and_mentions_database_url(capsys):
    """`outboxd --help` exits 0, lists the commands and tells how to point at the database."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("run", "migrate", "dead-letters"))
    assert "DATABASE_URL" in out
