"""A bad value, reported as the operator wrote it: each problem of a pydantic
ValidationError named where it was set (the flag, the variable, its *_FILE, the
.env entry, or the config file's key and path), and a choice among fixed values
with the choices and the closest one."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.settings.check import suggest
from daemon.settings.names import PREFIX, Setting, aliases, settings_of
from daemon.settings.sources import key_in_config


@dataclass(frozen=True)
class Given:
    """What the operator gave, place by place, highest precedence first."""

    flags: dict[str, str]  # each flag given, by the setting it sets: {"qdrant.url": "--qdrant-url"}
    environ: dict[str, str]
    dotenv: dict[str, str]
    config: dict[str, Any]
    config_path: Path | None = None


def where_set(s: Setting, given: Given) -> str:
    """Where the value of `s` that was validated came from, as the operator wrote it:
    --flag, VARIABLE_FILE, VARIABLE, VARIABLE in .env, key in /path/outboxd.toml."""
    flag = given.flags.get(".".join(s.path))
    if flag:
        return flag
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
    key = key_in_config(s, given.config)
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
            problems.append(f"{where_set(s, given)}: not a setting of [{s.path[0]}]{suggest(s.path[1], keys)}")
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
    name = next((n for n, f in fields.items() if loc[0] == n or loc[0] in aliases(f)), None)
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
