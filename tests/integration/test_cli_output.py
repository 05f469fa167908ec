"""What a new user sees of a one-shot command on the embedded defaults (no
DATABASE_URL, no QDRANT_URL), piped into a file or a CI log, as a real
`outboxd` process: its tables and nothing else (no warning a library prints
about XDG_RUNTIME_DIR, which most containers and CI jobs leave unset; no
database URL, which `run` prints), at a readable width, with a long value
folded onto the next lines rather than cut.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.processes import base_env

PIPED_WIDTH = 100  # daemon.commands.common.PIPED_WIDTH, as the user sees it


def status(data_dir: Path, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    env = base_env(**extra)
    env.pop("XDG_RUNTIME_DIR", None)
    if "COLUMNS" not in extra:
        env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--data-dir", str(data_dir)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit={result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def test_status_on_the_embedded_defaults_prints_its_tables_and_nothing_else(tmp_path):
    data_dir = tmp_path / "a-folder-whose-name-is-long-enough-that-its-path-cannot-fit-in-one-cell" / "data"
    result = status(data_dir, tmp_path)
    assert result.returncode == 0, report(result)
    # nothing on stderr: no RuntimeDirWarning and its source line, no URL, no log line at INFO
    assert result.stderr == "", report(result)
    assert "DATABASE_URL" not in result.stdout and "postgresql://" not in result.stdout, report(result)
    assert "Outbox" in result.stdout and "backlog (pending)" in result.stdout, report(result)

    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= PIPED_WIDTH, report(result)
    # the Qdrant folder's path, longer than any cell, is folded onto the next lines, whole
    qdrant_path = str(data_dir.resolve() / "qdrant")
    assert len(qdrant_path) > PIPED_WIDTH - 30
    assert qdrant_path in re.sub(r"[\s│]", "", result.stdout), report(result)

    narrow = status(data_dir, tmp_path, COLUMNS="70")
    assert narrow.returncode == 0, report(narrow)
    assert max(map(len, narrow.stdout.splitlines())) <= 70, report(narrow)
    assert qdrant_path in re.sub(r"[\s│]", "", narrow.stdout), report(narrow)
