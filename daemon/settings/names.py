"""The registry of names: every setting of a settings class (those inside its
tables included) and every name it answers to: OUTBOXD_<NAME>, or
OUTBOXD_<TABLE>__<NAME> inside a table, a conventional name where there is one
(DATABASE_URL, QDRANT_URL), and the deprecated flat name of a setting that moved
into a table (the class's `renamed`)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, ConfigDict, field_validator

PREFIX = "OUTBOXD_"


def env_variables(name: str, field) -> list[str]:
    """The environment variables a top-level setting is read from, the one to show first."""
    return [a for a in aliases(field) if a.isupper()] or [PREFIX + name.upper()]


def aliases(field) -> list[str]:
    """The names a field validates from besides its own (conventional ones are upper case)."""
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


class Table(BaseModel):
    """A table of settings: OUTBOXD_<TABLE>__<NAME> in the environment, [table] in
    the config file. A name it does not know is left to the name check (a warning,
    or exit 78 with --strict), as at the top level."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    _secret_file_problem = field_validator("*", mode="before")(secret_file_problem)


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


def nested_models(annotation) -> list[tuple[str, type[BaseModel]]]:
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
        models = nested_models(field.annotation)
        if not models:
            found.append(Setting((name,), tuple(env_variables(name, field)), is_secret(field), moved.get(name)))
            continue
        seen: set[str] = set()
        for _, model in models:
            for inner, inner_field in model.model_fields.items():
                if inner in seen:
                    continue
                seen.add(inner)
                conventional = tuple(a for a in aliases(inner_field) if a.isupper())
                found.append(Setting((name, inner), (*conventional, f"{PREFIX}{name.upper()}__{inner.upper()}"),
                                     is_secret(inner_field), moved.get(f"{name}.{inner}")))
    return tuple(found)


def setting(settings_cls, dotted: str) -> Setting:
    """A setting by its field path: "batch_size", "health.port"."""
    path = tuple(dotted.split("."))
    return next(s for s in settings_of(settings_cls) if s.path == path)
