"""docs/operating.md's backup and restore, pasted as written: its shell block,
run with bash against the session's Qdrant server, saves a real snapshot (a tar
archive, not Qdrant's list of snapshots), restores it after the collection is
lost, and ends with `outboxd reconcile --check` exiting 0.

The block is run under `set -euo pipefail`, so a variable it uses without
setting it, or a command of it that fails, fails the test. It is run in two
halves, split at its "the collection is lost" comment: between them the test
keeps writing, then deletes the collection."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO
from tests.processes import MODEL_LOAD_S, daemon_env
from tests.support import (
    add_document,
    assert_converged,
    drain,
    open_qdrant,
    physical_collection,
    require_server,
)

pytestmark = [pytest.mark.model, pytest.mark.slow]

LOST = "# … the collection is lost"


def backup_and_restore() -> tuple[str, str]:
    """The two halves of the page's backup and restore block."""
    text = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    section = text[text.index("## Backup and restore"):]
    block = re.search(r"^```sh\n(.*?)^```", section, re.M | re.S).group(1)
    backup, restore = block.split(LOST)
    return backup, "#" + restore


def bash(script: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    # QDRANT_API_KEY is empty for a server without a key; set in the shell only, so outboxd never sees it
    prelude = 'set -euo pipefail\n: "${QDRANT_API_KEY:=}"\n'
    return subprocess.run(["bash", "-c", prelude + script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=MODEL_LOAD_S + 300)


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit={result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


async def test_the_backup_and_restore_block_runs_as_written(conn, dsn, collection, embedder, make_settings, tmp_path):
    require_server()
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the block needs {', '.join(missing)} on PATH")
    backup, restore = backup_and_restore()

    # `outboxd` on PATH is this checkout's CLI
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "outboxd").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m daemon.cli "$@"\n')
    (bin_dir / "outboxd").chmod(0o755)
    env = daemon_env(dsn, tmp_path / "qdrant", collection)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    if env.get("OUTBOXD_QDRANT__CA_FILE"):
        env["CURL_CA_BUNDLE"] = env["OUTBOXD_QDRANT__CA_FILE"]

    settings = make_settings()
    _, ids = add_document(conn, [f"Before the snapshot, {n}." for n in ("one", "two", "three")])
    client = open_qdrant(":memory:")
    try:
        await drain(settings, dsn, embedder, client)
        physical = await physical_collection(client, collection)

        saved = bash(backup + 'printf "%s\\n" "$live"\n', env, tmp_path)
        assert saved.returncode == 0, report(saved)
        assert saved.stdout.splitlines()[-1] == physical, report(saved)
        snapshot = tmp_path / "chunks.snapshot"
        assert tarfile.is_tarfile(snapshot), f"chunks.snapshot is no snapshot: {snapshot.read_bytes()[:200]!r}"

        # life goes on after the backup, then the collection is lost (its alias with it)
        add_document(conn, ["Written after the snapshot."])
        conn.execute("UPDATE chunks SET text = 'Changed after the snapshot.' WHERE id = %s", (ids[0],))
        conn.execute("DELETE FROM chunks WHERE id = %s", (ids[1],))
        await drain(settings, dsn, embedder, client)
        await client.delete_collection(physical)
    finally:
        await client.close()

    # the terminal still has $live from the first half
    restored = bash(f"live={shlex.quote(physical)}\n" + restore, env, tmp_path)
    assert restored.returncode == 0, report(restored)

    client = open_qdrant(":memory:")
    try:
        assert await physical_collection(client, collection) == physical  # the alias is back
        assert await assert_converged(dsn, client, collection, embedder) == 3
    finally:
        await client.close()
