"""Where settings come from besides pydantic-settings' own sources: a secret's
*_FILE (the Kubernetes secret-file convention), the names pydantic's environment
source does not read (a table's conventional and deprecated names), the TOML
config file given with `--config`, and the entries of .env."""
from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic_settings import PydanticBaseSettingsSource

from daemon.errors import ConfigError
from daemon.settings.names import PREFIX, SecretFileError, Setting, settings_of


class SettingsConflict(ConfigError):
    """Two names of one setting set in the same place to different values."""


class ConfigFileError(ConfigError):
    """The config file cannot be read or parsed, or holds a secret (exit 78)."""


def _put(values: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    for part in path[:-1]:
        values = values.setdefault(part, {})
    values[path[-1]] = value


def _source_key(s: Setting) -> tuple[str, ...]:
    """Where a source puts a value: a top-level setting under the key the init and
    environment sources use for it (its first alias), a table's under its field name."""
    return (s.variable,) if len(s.path) == 1 and s.variable != PREFIX + s.path[0].upper() else s.path


class SecretFileSource(PydanticBaseSettingsSource):
    """Every secret setting is also read from the file named by <VARIABLE>_FILE
    (DATABASE_URL_FILE, QDRANT_API_KEY_FILE, KAFKA_SASL_PASSWORD_FILE,
    OUTBOXD_KAFKA__SASL_PASSWORD_FILE, ...): the Kubernetes secret-file convention,
    surrounding whitespace stripped. Setting a secret both directly and as a file
    is an error, not a silent choice."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, object]:
        values: dict[str, object] = {}
        for s in settings_of(self.settings_cls):
            if not s.secret:
                continue
            files = [f"{a}_FILE" for a in s.names if os.environ.get(f"{a}_FILE")]
            given = [a for a in s.names if os.environ.get(a)]
            if not files:
                continue
            key = _source_key(s)
            if len(files) + len(given) > 1:
                both = "both" if len(files) + len(given) == 2 else "all"
                _put(values, key, SecretFileError(f"{' and '.join(given + files)} are {both} set; set only one"))
                continue
            path = os.environ[files[0]]
            try:
                secret = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                _put(values, key, SecretFileError(f"cannot read {files[0]}={path}: {why}"))
                continue
            _put(values, key, secret or SecretFileError(f"{files[0]}={path} is an empty file"))
        return values


class OtherNamesSource(PydanticBaseSettingsSource):
    """The names pydantic's environment source does not read: a table's
    conventional variable (KAFKA_BOOTSTRAP_SERVERS for [kafka] bootstrap_servers),
    and a deprecated flat name (OUTBOXD_KAFKA_TOPIC for OUTBOXD_KAFKA__TOPIC). One
    instance reads the environment, another .env, each at that source's rank. Two
    names of one setting set in the same place to different values are refused."""

    def __init__(self, settings_cls, read: Callable[[], dict[str, str]], where: str) -> None:
        super().__init__(settings_cls)
        self.read, self.where = read, where

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        given = {k.upper(): v for k, v in self.read().items()}
        values: dict[str, Any] = {}
        for s in settings_of(self.settings_cls):
            found = {name: given[name] for name in s.names if name in given}
            here = [name for name in found if name in s.read_here]
            if not here:
                continue
            if len(set(found.values())) > 1:
                deprecated = f" ({s.old_variable} is its deprecated name)" if s.old_variable in found else ""
                raise SettingsConflict(
                    f"{' and '.join(found)} are set {self.where} to different values, and name the same "
                    f"setting: keep only {s.variable}{deprecated}"
                )
            _put(values, _source_key(s), found[here[0]])
        return values


# the TOML config file's contents and path while Settings are built from it (set by using_config)
_config_file: ContextVar[tuple[dict[str, Any], Path | None]] = ContextVar("outboxd_config", default=({}, None))


class ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML config file (`--config FILE`): top-level keys are setting names
    (batch_size = 256), a table's settings are under its name ([embedding],
    [health], [kafka]); a deprecated flat key (kafka_topic) is moved into its
    table. It sits below the environment, so a deployment can override one value."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data, path = _config_file.get()
        values = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        for s in settings_of(self.settings_cls):
            if not s.old or s.old not in values:
                continue
            value = values.pop(s.old)
            table = values.setdefault(s.path[0], {}) if len(s.path) > 1 else values
            if not isinstance(table, dict):
                continue  # [table] is not a table: validation says so
            if s.path[-1] in table and table[s.path[-1]] != value:
                raise SettingsConflict(
                    f"{s.old} and {s.key} are both set in {path or 'the config file'}, to different values, and "
                    f"name the same setting: keep only {s.key} ({s.old} is its deprecated name)"
                )
            table[s.path[-1]] = value
        return values


def read_config(path: Path, classes: Iterable[type] = ()) -> dict[str, Any]:
    """The TOML file's settings; a secret in it is refused (config files get
    copied, committed and shown: secrets belong in the environment or a *_FILE)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigFileError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"the config file {path} is not valid TOML: {exc}") from None
    secrets = sorted({key for cls in classes for s in settings_of(cls) if s.secret
                      for key in [key_in_config(s, data)] if key})
    if secrets:
        raise ConfigFileError(
            f"the config file {path} sets the secret(s) {', '.join(secrets)}: secrets come only from the "
            "environment or a file named by <VARIABLE>_FILE (e.g. DATABASE_URL_FILE); remove them from the file"
        )
    return data


def key_in_config(s: Setting, data: dict[str, Any]) -> str | None:
    """How the config file names this setting, where it sets it."""
    if len(s.path) == 1 and s.path[0] in data:
        return s.path[0]
    if len(s.path) > 1 and isinstance(data.get(s.path[0]), dict) and s.path[1] in data[s.path[0]]:
        return s.key
    return s.old if s.old and s.old in data else None


def using_config(data: dict[str, Any], path: Path | None = None):
    """Make `data` (read from `path`) the config file that Settings() read while the token is held."""
    return _config_file.set((data, path))


def dotenv_entries(path: Path = Path(".env")) -> dict[str, str]:
    """The variables a .env file sets."""
    if not path.is_file():
        return {}

    return {k: v or "" for k, v in dotenv_values(path).items()}


def environment() -> dict[str, str]:
    return dict(os.environ)
