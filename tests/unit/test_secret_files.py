"""Secrets from files (<ENV>_FILE, the Kubernetes secret-file convention): read
and stripped, conflicts and unreadable files refused with exit 78, the secret
itself never printed."""
from __future__ import annotations

import pytest

from daemon import cli
from daemon.config import Settings
from daemon.errors import EXIT_CONFIG

SECRET_VARS = ["DATABASE_URL", "OUTBOXD_DATABASE_URL", "QDRANT_API_KEY", "OUTBOXD_QDRANT__API_KEY",
               "OUTBOXD_QDRANT_API_KEY", "EMBEDDING_API_KEY", "OUTBOXD_EMBEDDING__API_KEY", "OUTBOXD_EMBEDDING_API_KEY"]
SECRET = "postgresql://outboxd:s3cr3t-pw@db.example/outboxd?sslmode=verify-full"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in SECRET_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout


def secret_file(tmp_path, content: str, name: str = "secret"):
    path = tmp_path / name
    path.write_text(content)
    return path


@pytest.mark.parametrize("var, field", [
    ("DATABASE_URL_FILE", "database_url"),
    ("OUTBOXD_DATABASE_URL_FILE", "database_url"),
    ("QDRANT_API_KEY_FILE", "qdrant.api_key"),
    ("OUTBOXD_QDRANT__API_KEY_FILE", "qdrant.api_key"),
    ("OUTBOXD_QDRANT_API_KEY_FILE", "qdrant.api_key"),  # its name before [qdrant] (deprecated)
    ("EMBEDDING_API_KEY_FILE", "embedding.api_key"),
    ("OUTBOXD_EMBEDDING__API_KEY_FILE", "embedding.api_key"),
])
def test_secret_is_read_from_the_file_stripped(monkeypatch, tmp_path, var, field):
    """Each secret's *_FILE variable supplies the file content without surrounding whitespace."""
    monkeypatch.setenv(var, str(secret_file(tmp_path, f"\n  {SECRET}\t\n")))
    value = Settings()
    for part in field.split("."):
        value = getattr(value, part)
    assert value.get_secret_value() == SECRET


def test_a_flag_wins_over_the_file(monkeypatch, tmp_path):
    """As with every setting, the CLI flag (an init value) wins over the environment."""
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret_file(tmp_path, SECRET)))
    assert Settings(database_url="postgresql:///flag").database_url.get_secret_value() == "postgresql:///flag"


def test_settings_without_files_are_unchanged(monkeypatch):
    """Without *_FILE variables the direct variables work as before."""
    monkeypatch.setenv("QDRANT_API_KEY", "direct-key")
    assert Settings().qdrant.api_key.get_secret_value() == "direct-key"


@pytest.mark.parametrize("direct", ["DATABASE_URL", "OUTBOXD_DATABASE_URL", "DATABASE_URL_FILE"])
def test_variable_and_file_both_set_is_a_config_error(monkeypatch, tmp_path, capsys, direct):
    """Setting a secret twice exits 78 naming both variables, and prints neither value."""
    monkeypatch.setenv("OUTBOXD_DATABASE_URL_FILE", str(secret_file(tmp_path, SECRET)))
    monkeypatch.setenv(direct, SECRET if direct != "DATABASE_URL_FILE" else str(secret_file(tmp_path, SECRET, "b")))
    assert cli.main(["roles"]) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert direct in captured.err and "OUTBOXD_DATABASE_URL_FILE" in captured.err
    assert "s3cr3t" not in captured.err + captured.out


def test_missing_file_names_the_variable_and_path(monkeypatch, tmp_path, capsys):
    """A *_FILE pointing nowhere exits 78 naming the variable and the path."""
    missing = tmp_path / "not-there"
    monkeypatch.setenv("QDRANT_API_KEY_FILE", str(missing))
    assert cli.main(["roles"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "QDRANT_API_KEY_FILE" in err and str(missing) in err and "No such file" in err


def test_unreadable_file_is_an_error_without_its_content(monkeypatch, tmp_path, capsys):
    """A path that cannot be read as text (a folder, bad bytes) is refused; nothing of it is printed."""
    monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path))  # a directory
    assert cli.main(["roles"]) == EXIT_CONFIG
    assert "DATABASE_URL_FILE" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.write_bytes(b"s3cr3t\xff\xfe")
    monkeypatch.setenv("DATABASE_URL_FILE", str(bad))
    assert cli.main(["roles"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(bad) in err and "s3cr3t" not in err


def test_empty_file_is_an_error(monkeypatch, tmp_path):
    """A secret file holding only whitespace is refused rather than read as an empty secret."""
    monkeypatch.setenv("QDRANT_API_KEY_FILE", str(secret_file(tmp_path, " \n")))
    with pytest.raises(ValueError, match="QDRANT_API_KEY_FILE=.* is an empty file"):
        Settings()
