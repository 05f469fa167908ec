"""The name check: the OUTBOXD_ variables, .env entries and config keys that no
setting answers to (a mistyped name: a warning naming the closest real setting,
or exit 78 with --strict), and the deprecated names in use (a warning naming
the new one)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from daemon.settings.names import PREFIX, settings_of

NEAR_MISS = 0.85  # QDRANT_URLL or DATABSE_URL, not QDRANT_HOST: another tool's own variable


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
                unknown.append(f"unknown {where} {variable}{suggest(name, {**known, **old})}")
    in_file = f" in {config_path}" if config_path else ""
    for key, value in config.items():
        if key in old_keys:
            deprecated.append(f"config key {key!r}{in_file} is deprecated: use {old_keys[key]} instead")
        elif key not in keys:
            unknown.append(f"unknown config key {key!r}{suggest(key, {**{k: k for k in keys}, **old_keys})}")
        elif isinstance(value, dict) and keys[key]:
            for inner in value:
                if inner not in keys[key]:
                    unknown.append(f"unknown config key [{key}] {inner!r}{suggest(inner, keys[key])}")
    return Names(unknown, deprecated)


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    target = known[close[0]] if isinstance(known, dict) else close[0]
    return f"; did you mean {target}?"
