"""Folders for the servers a test session starts (PostgreSQL, Qdrant), named
after the session, so that the session's leak check (tests/conftest.py) finds
its own servers and never stops another session's running beside it. A
process the session starts (a benchmark script) inherits the tag."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

SESSION_VARIABLE = "PYTEST_OUTBOXD_SESSION"
KINDS = ("test-pg", "bench-pg", "test-qdrant")


def session_tag() -> str:
    return os.environ.setdefault(SESSION_VARIABLE, str(os.getpid()))


def server_folder(kind: str) -> Path:
    """A new folder for a server of this kind (one of KINDS), tagged with the session."""
    assert kind in KINDS, kind
    return Path(tempfile.mkdtemp(prefix=f"outboxd-{kind}-{session_tag()}-"))


def session_prefixes() -> tuple[str, ...]:
    """What the folders of this session's servers start with."""
    return tuple(f"outboxd-{kind}-{session_tag()}-" for kind in KINDS)
