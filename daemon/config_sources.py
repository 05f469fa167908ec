"""Where settings come from besides the environment, and the names that may be
set: a secret's *_FILE (the Kubernetes secret-file convention), the TOML config
file given with `--config`, and the check that catches a mistyped OUTBOXD_
variable or config key (a warning naming the closest real setting, or exit 78
with --strict).
"""
from __future__ import annotations

import difflib
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_settings import PydanticBaseSettingsSource

PREFIX = "OUTBOXD_"


def env_variables(name: str, field) -> list[str]:
    """The environment variables setting `name` is read from, the one to show first."""
    aliases = field.validation_alias.choices if field.validation_alias else []
    return [a for a in aliases if isinstance(a, str) and a.isupper()] or [PREFIX + name.upper()]


def is_secret(field) -> bool:
    return "SecretStr" in str(field.annotation)
# the TOML config file's contents while Settings are built from it (set by load_config)
_config_data: ContextVar[dict[str, Any]] = ContextVar("outboxd_config", default={})


class SecretFileError(str):
    """A *_FILE problem, carried to the field validator so that it surfaces as an
    ordinary invalid setting (exit 78) naming the variable and path, never content."""


class SecretFileSource(PydanticBaseSettingsSource):
    """Every secret setting is also read from the file named by <ENV>_FILE
    (DATABASE_URL_FILE, QDRANT_API_KEY_FILE, OUTBOXD_DATABASE_URL_FILE, ...): the
    Kubernetes secret-file convention, surrounding whitespace stripped. Setting
    a secret both directly and as a file is an error, not a silent choice."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, object]:
        values: dict[str, object] = {}
        for name, field in self.settings_cls.model_fields.items():
            if not is_secret(field):
                continue
            direct = env_variables(name, field)
            files = [f"{a}_FILE" for a in direct if os.environ.get(f"{a}_FILE")]
            given = [a for a in direct if os.environ.get(a)]
            if not files:
                continue
            key = direct[0]  # the key the init and env sources use for this field
            if len(files) + len(given) > 1:
                both = "both" if len(files) + len(given) == 2 else "all"
                values[key] = SecretFileError(f"{' and '.join(given + files)} are {both} set; set only one")
                continue
            path = os.environ[files[0]]
            try:
                secret = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                values[key] = SecretFileError(f"cannot read {files[0]}={path}: {why}")
                continue
            values[key] = secret or SecretFileError(f"{files[0]}={path} is an empty file")
        return values


class ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML config file (`--config FILE`): top-level keys are setting names
    (batch_size = 256), the [embedding] table the backend's own settings. It
    sits below the environment, so a deployment can override one value."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_config_data.get())


class ConfigFileError(ValueError):
    """The config file cannot be read or parsed (exit 78)."""


def read_config(path: Path, settings_cls=None) -> dict[str, Any]:
    """The TOML file's settings; a secret in it is refused (config files get
    copied, committed and shown: secrets belong in the environment or a *_FILE)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigFileError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"the config file {path} is not valid TOML: {exc}") from None
    if settings_cls is not None:
        secrets = [name for name, field in settings_cls.model_fields.items() if is_secret(field) and name in data]
        if secrets:
            raise ConfigFileError(
                f"the config file {path} sets the secret(s) {', '.join(secrets)}: secrets come only from the "
                "environment or a file named by <VARIABLE>_FILE (e.g. DATABASE_URL_FILE); remove them from the file"
            )
    return data


def using_config(data: dict[str, Any]):
    """Make `data` the config file that Settings() read while the token is held."""
    return _config_data.set(data)


# --- mistyped names --------------------------------------------------------------------
def env_names(settings_cls) -> dict[str, str]:
    """Every OUTBOXD_ variable a setting answers to -> the setting's display name."""
    names: dict[str, str] = {}
    for name, field in settings_cls.model_fields.items():
        env = env_variables(name, field)
        for variable in env:
            if variable.startswith(PREFIX):
                names[variable] = env[0]
            if is_secret(field):
                names[f"{variable}_FILE"] = f"{env[0]}_FILE"
        for _, model in _nested_models(field.annotation):
            for key in model.model_fields:
                names[f"{PREFIX}{name.upper()}__{key.upper()}"] = f"{PREFIX}{name.upper()}__{key.upper()}"
    return names


def _nested_models(annotation) -> list[tuple[str, type[BaseModel]]]:
    """The pydantic models inside a field's type (the embedding union's members)."""
    found = []
    stack = [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append((t.__name__, t))
        stack.extend(getattr(t, "__args__", ()) or ())  # unions, and Annotated's inner type
    return found


def config_keys(settings_cls) -> dict[str, set[str]]:
    """Top-level config-file keys, and the keys each table (e.g. [embedding]) may hold."""
    keys: dict[str, set[str]] = {name: set() for name in settings_cls.model_fields}
    for name, field in settings_cls.model_fields.items():
        for _, model in _nested_models(field.annotation):
            keys[name] |= set(model.model_fields)
    return keys


def unknown_settings(settings_cls, environ: dict[str, str], dotenv: dict[str, str], config: dict[str, Any]) -> list[str]:
    """A sentence per name that looks like a setting but is none, with the
    closest real one where there is a close one."""
    problems = []
    known = env_names(settings_cls)
    for where, variables in (("environment variable", environ), (".env entry", dotenv)):
        for variable in sorted(variables):
            if variable.startswith(PREFIX) and variable.upper() not in known:
                problems.append(f"unknown {where} {variable}{_suggest(variable.upper(), known)}")
    keys = config_keys(settings_cls)
    for key, value in config.items():
        if key not in keys:
            problems.append(f"unknown config key {key!r}{_suggest(key, keys)}")
        elif isinstance(value, dict) and keys[key]:
            for inner in value:
                if inner not in keys[key]:
                    problems.append(f"unknown config key [{key}] {inner!r}{_suggest(inner, keys[key])}")
    return problems


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    target = known[close[0]] if isinstance(known, dict) and isinstance(known[close[0]], str) else close[0]
    return f"; did you mean {target}?"


def dotenv_entries(path: Path = Path(".env")) -> dict[str, str]:
    """The variables a .env file sets (names only matter here)."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


def environment() -> dict[str, str]:
    return dict(os.environ)
