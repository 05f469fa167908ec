"""A real Qdrant cluster for the tests: N nodes (3 by default) of the same server
binary as tests/qdrant_server.py, on one machine, each on free loopback ports
(HTTP, gRPC and p2p) in a folder of its own under one folder of the cluster.

The first node starts alone; every other node joins through the first's p2p
URL. kill(i) crashes a node (SIGKILL, as a lost machine would); restart(i)
starts it again on its storage, where it finds its peers (so it never
bootstraps twice), and returns once it is ready and the others reach it.
Every node is stopped by its pid at the end, and dies with the process that
started it (PR_SET_PDEATHSIG) should the test run itself be killed.
"""
from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import httpx

from tests.folders import server_folder
from tests.qdrant_server import READY_TIMEOUT, QdrantServer, free_port


class ClusterNode(QdrantServer):
    """One node: a QdrantServer in distributed mode, with its p2p port."""

    def __init__(self, binary: Path, folder: Path, *, bootstrap: str | None) -> None:
        super().__init__(binary, folder)
        self.p2p_port = free_port()
        self.bootstrap = bootstrap  # the first node's p2p URL; None for the first node itself
        self.started_at = datetime.now(UTC)  # when it last became ready: failures to reach it before then are history

    @property
    def p2p_url(self) -> str:
        return f"http://127.0.0.1:{self.p2p_port}"

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        env.update(QDRANT__CLUSTER__ENABLED="true", QDRANT__CLUSTER__P2P__PORT=str(self.p2p_port))
        return env

    def _arguments(self) -> list[str]:
        args = [*super()._arguments(), "--uri", self.p2p_url]
        # a node that joined once finds its peers in its storage; bootstrapping it again would re-join it
        if self.bootstrap and not (self.folder / "storage").exists():
            args += ["--bootstrap", self.bootstrap]
        return args

    def start(self, timeout: float = READY_TIMEOUT) -> ClusterNode:
        super().start(timeout)
        self.started_at = datetime.now(UTC)  # ready: a peer that fails to reach it from now on really cannot
        return self

    def cluster(self) -> dict[str, Any]:
        """GET /cluster on this node: its peers, the raft state, the peers it fails to reach."""
        with httpx.Client(timeout=5) as http:
            return http.get(f"{self.url}/cluster").raise_for_status().json()["result"]


def _since(failure: dict[str, Any], started: datetime) -> bool:
    """A failure to send to a peer that happened since it (re)started. A follower that
    failed to reach a killed node keeps that record until it next sends to it, which
    may be never: the leader alone sends heartbeats."""
    stamp = failure.get("latest_error_timestamp")
    if not stamp:
        return True
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    when = datetime.fromisoformat(f"{whole}.{(fraction or '0')[:6]}+00:00")
    return when >= started


class QdrantCluster:
    """N nodes forming one cluster. start() returns once every node lists every peer."""

    def __init__(self, binary: Path, size: int = 3, folder: Path | None = None) -> None:
        self._own_folder = folder is None
        self.folder = Path(folder) if folder else server_folder("test-qdrant")
        self.nodes: list[ClusterNode] = []
        for i in range(size):
            bootstrap = self.nodes[0].p2p_url if i else None
            self.nodes.append(ClusterNode(binary, self.folder / f"node{i}", bootstrap=bootstrap))
        self.peer_ids: list[int] = []  # node i's peer id, once started

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self, timeout: float = READY_TIMEOUT) -> QdrantCluster:
        try:
            for node in self.nodes:  # one by one: each joins through the first, which must answer already
                node.start(timeout)
            self.wait_formed(timeout)
        except BaseException:
            self.close()
            raise
        self.peer_ids = [int(node.cluster()["peer_id"]) for node in self.nodes]
        return self

    def formed(self) -> bool:
        """Every running node lists every peer, knows the leader, and reaches every other running node."""
        running = [node for node in self.nodes if node.running]
        started = {f"{node.p2p_url}/": node.started_at for node in running}
        try:
            views = [node.cluster() for node in running]
        except httpx.HTTPError:
            return False
        return all(
            len(view.get("peers") or {}) == len(self.nodes)
            and (view.get("raft_info") or {}).get("leader") is not None
            and not any(_since(failure, started[url]) for url, failure in (view.get("message_send_failures") or {}).items()
                        if url in started)
            for view in views
        )

    def wait_formed(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.formed():
            if time.monotonic() >= deadline:
                views = {}
                for i, node in enumerate(self.nodes):
                    try:
                        views[i] = node.cluster() if node.running else "not running"
                    except httpx.HTTPError as exc:
                        views[i] = repr(exc)
                raise RuntimeError(f"the Qdrant cluster did not form within {timeout:.0f}s: {views}")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        """SIGKILL node i: a crash, as a lost machine would be."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = READY_TIMEOUT) -> None:
        """Start node i again on its storage and ports; return once it is ready and every running node reaches it."""
        self.nodes[i].start(timeout)
        self.wait_formed(timeout)

    def heal(self) -> None:
        """Restart every node that is down (one a failed test left killed)."""
        for i, node in enumerate(self.nodes):
            if not node.running:
                self.restart(i)

    def close(self) -> None:
        for node in self.nodes:
            node.stop(timeout=10)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return f"a {len(self.nodes)}-node Qdrant {self.nodes[0].version or '?'} cluster at " + ", ".join(
            node.url for node in self.nodes)
