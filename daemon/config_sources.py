"""Where settings come from besides pydantic-settings' own sources, the names
each setting answers to, and how a wrong one is reported.

Names. A setting is OUTBOXD_<NAME>, or OUTBOXD_<TABLE>__<NAME> inside a table
(the embedding backend's, the health endpoint's, a wing's such as [kafka]); a
few also have a conventional name (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS). A
setting that moved into a table keeps its old flat name (OUTBOXD_KAFKA_TOPIC,
`kafka_topic` in the config file) as a deprecated one: read, with a warning
naming the new one (a settings class's `renamed`).

Sources: a secret's *_FILE (the Kubernetes secret-file convention), the names
pydantic's environment source does not read (a table's conventional and
deprecated names), and the TOML config file given with `--config`.

Reports: a mistyped OUTBOXD_ variable or config key (a warning naming the
closest real setting, or exit 78 with --strict), a deprecated name, and a bad
value named where it was set (the variable, the flag, or the file's key).
"""
from __future__ import annotations

import difflib
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_settings import PydanticBaseSettingsSource

from daemon.errors import ConfigError

PREFIX = "OUTBOXD_"
NEAR_MISS = 0.85  # QDRANT_URLL or DATABSE_URL, not QDRANT_HOST: another tool's own variable


def env_variables(name: str, field) -> list[str]:
    """The environment variables a top-level setting is read from, the one to show first."""
    return [a for a in _aliases(field) if a.isupper()] or [PREFIX + name.upper()]


def _aliases(field) -> list[str]:
    alias = field.validation_alias
    return [a for a in alias.choices if isinstance(a, str)] if alias is not None else []


def is_secret(field) -> bool:
    return "SecretStr" in str(field.annotation)


class SecretFileError(str):
    """A *_FILE problem, carried to the field validator so that it surfaces as an
    ordinary invalid setting (exit 78) naming the variable and path, never content."""


def secret_file_problem(v: object) -> object:
    """A field validator for every setting (only a secret's *_FILE can be a SecretFileError)."""
    if isinstance(v, SecretFileError):
        raise ValueError(str(v))
    return v


class SettingsConflict(ConfigError):
    """Two names of one setting set in the same place to different values."""


class ConfigFileError(ConfigError):
    """The config file cannot be read or parsed, or holds a secret (exit 78)."""


class Table(BaseModel):
    """A table of settings: OUTBOXD_<TABLE>__<NAME> in the environment, [table] in
    the config file. A name it does not know is left to the name check (a warning,
    or exit 78 with --strict), as at the top level."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    _secret_file_problem = field_validator("*", mode="before")(secret_file_problem)


# --- the names of each setting ---------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One setting and every name it answers to."""

    path: tuple[str, ...]  # ("batch_size",), or ("kafka", "topic") inside a table
    variables: tuple[str, ...]  # the environment variables it is read from, the one to show first
    secret: bool
    old: str | None = None  # its flat name before it moved into its table (deprecated)

    @property
    def variable(self) -> str:
        return self.variables[0]

    @property
    def key(self) -> str:
        """Its name in the config file."""
        return self.path[0] if len(self.path) == 1 else f"[{self.path[0]}] {self.path[1]}"

    @property
    def old_variable(self) -> str | None:
        return PREFIX + self.old.upper() if self.old else None

    @property
    def names(self) -> tuple[str, ...]:
        """Every environment variable it answers to, the deprecated one last."""
        return self.variables + ((self.old_variable,) if self.old else ())

    @property
    def read_here(self) -> tuple[str, ...]:
        """The names pydantic's environment source does not read (OtherNamesSource does):
        a table's conventional names, and the deprecated one."""
        table = self.variables[:-1] if len(self.path) > 1 else ()  # the last is OUTBOXD_<TABLE>__<NAME>
        return table + ((self.old_variable,) if self.old else ())

    def instead(self) -> str:
        """What to set instead of the deprecated name."""
        return " or ".join(reversed(self.variables))  # the OUTBOXD_ one first, as the old name was


def _nested_models(annotation) -> list[tuple[str, type[BaseModel]]]:
    """The pydantic models inside a field's type (a table, or the embedding union's members)."""
    found = []
    stack = [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append((t.__name__, t))
        stack.extend(getattr(t, "__args__", ()) or ())  # unions, and Annotated's inner type
    return found


@cache
def settings_of(settings_cls) -> tuple[Setting, ...]:
    """Every setting of a settings class, the ones inside its tables included."""
    moved = {new: old for old, new in getattr(settings_cls, "renamed", {}).items()}
    found: list[Setting] = []
    for name, field in settings_cls.model_fields.items():
        models = _nested_models(field.annotation)
        if not models:
            found.append(Setting((name,), tuple(env_variables(name, field)), is_secret(field), moved.get(name)))
            continue
        seen: set[str] = set()
        for _, model in models:
            for inner, inner_field in model.model_fields.items():
                if inner in seen:
                    continue
                seen.add(inner)
                conventional = tuple(a for a in _aliases(inner_field) if a.isupper())
                found.append(Setting((name, inner), (*conventional, f"{PREFIX}{name.upper()}__{inner.upper()}"),
                                     is_secret(inner_field), moved.get(f"{name}.{inner}")))
    return tuple(found)


def setting(settings_cls, dotted: str) -> Setting:
    """A setting by its field path: "batch_size", "health.port"."""
    path = tuple(dotted.split("."))
    return next(s for s in settings_of(settings_cls) if s.path == path)


def _put(values: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    for part in path[:-1]:
        values = values.setdefault(part, {})
    values[path[-1]] = value


def _source_key(s: Setting) -> tuple[str, ...]:
    """Where a source puts a value: a top-level setting under the key the init and
    environment sources use for it (its first alias), a table's under its field name."""
    return (s.variable,) if len(s.path) == 1 and s.variable != PREFIX + s.path[0].upper() else s.path


# --- sources ------------------------------------------------------------------------------
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
                      for key in [_key_in_config(s, data)] if key})
    if secrets:
        raise ConfigFileError(
            f"the config file {path} sets the secret(s) {', '.join(secrets)}: secrets come only from the "
            "environment or a file named by <VARIABLE>_FILE (e.g. DATABASE_URL_FILE); remove them from the file"
        )
    return data


def _key_in_config(s: Setting, data: dict[str, Any]) -> str | None:
    """How the config file names this setting, where it sets it."""
    if len(s.path) == 1 and s.path[0] in data:
        return s.path[0]
    if len(s.path) > 1 and isinstance(data.get(s.path[0]), dict) and s.path[1] in data[s.path[0]]:
        return s.key
    return s.old if s.old and s.old in data else None


def using_config(data: dict[str, Any], path: Path | None = None):
    """Make `data` (read from `path`) the config file that Settings() read while the token is held."""
    return _config_file.set((data, path))


# --- the name check ------------------------------------------------------------------------
class Names(NamedTuple):
    unknown: list[str]  # a sentence per name that looks like a setting but is none
    deprecated: list[str]  # a sentence per deprecated name, naming the one to use


def check_names(classes: Iterable[type], environ: dict[str, str], dotenv: dict[str, str],
                config: dict[str, Any], config_path: Path | None = None) -> Names:
    """The OUTBOXD_ variables, .env entries and config keys that no setting of
    `classes` answers to (with the closest real one where there is a close one),
    and the deprecated names among them."""
    known: dict[str, str] = {}  # OUTBOXD_ variable -> the name to show
    old: dict[str, str] = {}  # deprecated variable -> what to set instead
    keys: dict[str, set[str]] = {}  # config key -> the keys its table may hold
    old_keys: dict[str, str] = {}  # deprecated config key -> the new one
    for cls in classes:
        for s in settings_of(cls):
            for variable in s.variables:
                if variable.startswith(PREFIX):
                    known[variable] = s.variable
                    if s.secret:
                        known[f"{variable}_FILE"] = f"{s.variable}_FILE"
            keys.setdefault(s.path[0], set()).update(s.path[1:])
            if s.old:
                old[s.old_variable] = s.instead()
                if s.secret:
                    old[f"{s.old_variable}_FILE"] = " or ".join(f"{v}_FILE" for v in reversed(s.variables))
                old_keys[s.old] = s.key
    # the conventional names (DATABASE_URL, QDRANT_URL, ...) carry no prefix to
    # catch a typo by, so a name a letter or two away from one is the typo
    conventional = {v for cls in classes for s in settings_of(cls) for v in s.variables if not v.startswith(PREFIX)}
    conventional |= {f"{v}_FILE" for cls in classes for s in settings_of(cls) if s.secret
                     for v in s.variables if not v.startswith(PREFIX)}
    unknown, deprecated = [], []
    for where, variables in (("environment variable", environ), (".env entry", dotenv)):
        for variable in sorted(variables):
            name = variable.upper()
            if not name.startswith(PREFIX):
                near = difflib.get_close_matches(name, conventional, n=1, cutoff=NEAR_MISS)
                if near and name not in conventional:
                    unknown.append(f"{where} {variable} is not read by outboxd; did you mean {near[0]}?")
                continue
            if name in known:
                continue
            if name in old:
                deprecated.append(f"{where} {variable} is deprecated: set {old[name]} instead")
            else:
                unknown.append(f"unknown {where} {variable}{_suggest(name, {**known, **old})}")
    in_file = f" in {config_path}" if config_path else ""
    for key, value in config.items():
        if key in old_keys:
            deprecated.append(f"config key {key!r}{in_file} is deprecated: use {old_keys[key]} instead")
        elif key not in keys:
            unknown.append(f"unknown config key {key!r}{_suggest(key, {**{k: k for k in keys}, **old_keys})}")
        elif isinstance(value, dict) and keys[key]:
            for inner in value:
                if inner not in keys[key]:
                    unknown.append(f"unknown config key [{key}] {inner!r}{_suggest(inner, keys[key])}")
    return Names(unknown, deprecated)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    target = known[close[0]] if isinstance(known, dict) else close[0]
    return f"; did you mean {target}?"


def dotenv_entries(path: Path = Path(".env")) -> dict[str, str]:
    """The variables a .env file sets."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


def environment() -> dict[str, str]:
    return dict(os.environ)


# --- where a bad value was set ---------------------------------------------------------------
@dataclass(frozen=True)
class Given:
    """What the operator gave, place by place, highest precedence first."""

    flags: dict[str, Any]
    environ: dict[str, str]
    dotenv: dict[str, str]
    config: dict[str, Any]
    config_path: Path | None = None


def where_set(s: Setting, given: Given) -> str:
    """Where the value of `s` that was validated came from, as the operator wrote it:
    --flag, VARIABLE_FILE, VARIABLE, VARIABLE in .env, key in /path/outboxd.toml."""
    if len(s.path) == 1 and s.path[0] in given.flags:
        return "--" + s.path[0].replace("_", "-")
    environ = {k.upper() for k in given.environ}
    if s.secret:
        for name in s.names:
            if f"{name}_FILE" in environ:
                return f"{name}_FILE"
    for name in s.names:
        if name in environ:
            return name
    dotenv = {k.upper() for k in given.dotenv}
    for name in s.names:
        if name in dotenv:
            return f"{name} in .env"
    key = _key_in_config(s, given.config)
    if key:
        return f"{key} in {given.config_path or 'the config file'}"
    return s.variable


def describe_validation(exc, settings_cls, given: Given) -> str:
    """Each problem of a pydantic ValidationError, named where the operator set
    it; a choice among fixed values lists them and suggests the closest."""
    problems = []
    for error in exc.errors():
        s, table = _setting_of(settings_cls, error)
        if error["type"] == "extra_forbidden" and s is not None:
            keys = [k.path[1] for k in settings_of(settings_cls) if k.path[0] == s.path[0] and len(k.path) > 1]
            problems.append(f"{where_set(s, given)}: not a setting of [{s.path[0]}]{_suggest(s.path[1], keys)}")
            continue
        if s is not None:
            where = f"{where_set(s, given)}: "
        elif table is not None:
            where = f"{PREFIX}{table.upper()} ([{table}]): "
        else:
            where = ""
        problems.append(where + _message(error, secret=s is not None and s.secret))
    return "; ".join(problems)


def _setting_of(settings_cls, error) -> tuple[Setting | None, str | None]:
    """The setting an error is about (a discriminated union's tag left out of its
    path), or the table it is about when no single setting is."""
    loc = [part for part in error["loc"] if isinstance(part, str)]
    if not loc:
        return None, None
    fields = settings_cls.model_fields
    name = next((n for n, f in fields.items() if loc[0] == n or loc[0] in _aliases(f)), None)
    if name is None:
        return None, None
    settings = [s for s in settings_of(settings_cls) if s.path[0] == name]
    if len(settings) == 1 and len(settings[0].path) == 1:
        return settings[0], None
    inner = next((part for part in loc[1:] if any(part == s.path[1] for s in settings)), None)
    if inner is None and error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        inner = error["ctx"]["discriminator"].strip("'")
    if inner is None and error["type"] == "extra_forbidden" and len(loc) > 1:  # a key the table does not have
        return Setting((name, loc[-1]), (f"{PREFIX}{name.upper()}__{loc[-1].upper()}",), False), None
    found = next((s for s in settings if s.path[1] == inner), None)
    return (found, None) if found is not None else (None, name)


def _choices(expected: str) -> list[str]:
    return re.findall(r"'([^']*)'", expected)


def _message(error, *, secret: bool) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("union_tag_invalid", "literal_error"):
        given = ctx["tag"] if kind == "union_tag_invalid" else error["input"]
        choices = _choices(ctx["expected_tags"] if kind == "union_tag_invalid" else ctx["expected"])
        return f"{given!r} is not one of {', '.join(choices)}{suggest_choice(given, choices)}"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if kind != "value_error" and not secret and isinstance(value, str | int | float) and not isinstance(value, bool):
        message += f" (given: {value!r})"
    return message


def suggest_choice(given: object, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(given).lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {choices[[c.lower() for c in choices].index(close[0])]}?" if close else ""
