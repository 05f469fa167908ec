"""A real Qdrant server for the tests and the benchmark harness, run from its
binary: on free loopback ports, in a folder of its own, stopped by its pid.

Which Qdrant a test session uses (tests/conftest.py), first match wins:

1. QDRANT_URL, where it is set: your own server;
2. a Qdrant server binary: OUTBOXD_TEST_QDRANT_BIN, else `qdrant` on PATH,
   else the 1.19 build kept beside the checkout (../shared/qdrant/qdrant);
3. a `qdrant/qdrant` container (testcontainers), where a Docker engine answers;
4. qdrant-client's local mode.

OUTBOXD_TEST_QDRANT=server|container|local picks one of the last three.
Tests about local mode itself (its one-process lock, `:memory:`) use local
mode in every session.

A server started here dies with the process that started it (PR_SET_PDEATHSIG),
so not even a killed test run leaves one behind.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.folders import server_folder

REPO = Path(__file__).resolve().parents[1]
BINARY_VARIABLE = "OUTBOXD_TEST_QDRANT_BIN"
CHOICE_VARIABLE = "OUTBOXD_TEST_QDRANT"
BESIDE_CHECKOUT = REPO.parent / "shared" / "qdrant" / "qdrant"
CONTAINER_IMAGE = "qdrant/qdrant:v1.19.0"
READY_TIMEOUT = 60.0


def find_binary() -> Path | None:
    """The Qdrant server binary the tests (and the benchmark harness) may start,
    or None; none with OUTBOXD_TEST_QDRANT=local."""
    if os.environ.get(CHOICE_VARIABLE) == "local":
        return None
    given = os.environ.get(BINARY_VARIABLE)
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"{BINARY_VARIABLE}={given} is not an executable file")
        return path
    on_path = shutil.which("qdrant")
    if on_path:
        return Path(on_path)
    return BESIDE_CHECKOUT if BESIDE_CHECKOUT.is_file() and os.access(BESIDE_CHECKOUT, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Tls:
    """A private CA and a certificate it signed for 127.0.0.1 and localhost (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> "Tls":
        import trustme

        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="outboxd tests")
        issued = ca.issue_cert("127.0.0.1", "localhost")
        tls = cls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
        ca.cert_pem.write_to_path(str(tls.ca))
        issued.private_key_pem.write_to_path(str(tls.key))
        issued.cert_chain_pems[0].write_to_path(str(tls.cert))
        for extra in issued.cert_chain_pems[1:]:
            with open(tls.cert, "ab") as f:
                f.write(extra.bytes())
        return tls


class QdrantServer:
    """One Qdrant server process. start() returns once /readyz answers; stop()
    is a clean SIGTERM, kill() a crash; start() again on the same folder and
    ports recovers the collections from the write-ahead log."""

    def __init__(
        self,
        binary: Path,
        folder: Path | None = None,
        *,
        api_key: str | None = None,
        read_only_api_key: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.binary = binary
        self._own_folder = folder is None
        self.folder = Path(folder) if folder else server_folder("test-qdrant")
        self.api_key = api_key
        self.read_only_api_key = read_only_api_key
        self.tls = tls
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.version: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QDRANT__")}
        env.update(
            QDRANT__SERVICE__HOST="127.0.0.1",
            QDRANT__SERVICE__HTTP_PORT=str(self.http_port),
            QDRANT__SERVICE__GRPC_PORT=str(self.grpc_port),
            QDRANT__STORAGE__STORAGE_PATH=str(self.folder / "storage"),
            QDRANT__STORAGE__SNAPSHOTS_PATH=str(self.folder / "snapshots"),
            QDRANT__SERVICE__ENABLE_STATIC_CONTENT="false",
            QDRANT__TELEMETRY_DISABLED="true",
            QDRANT__LOG_LEVEL="WARN",
        )
        if self.api_key:
            env["QDRANT__SERVICE__API_KEY"] = self.api_key
        if self.read_only_api_key:
            env["QDRANT__SERVICE__READ_ONLY_API_KEY"] = self.read_only_api_key
        if self.tls:
            env.update(QDRANT__SERVICE__ENABLE_TLS="true", QDRANT__TLS__CERT=str(self.tls.cert),
                       QDRANT__TLS__KEY=str(self.tls.key))
        return env

    def _arguments(self) -> list[str]:
        return ["--disable-telemetry"]

    def start(self, timeout: float = READY_TIMEOUT) -> "QdrantServer":
        if self.running:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "qdrant.log", "ab") as log:
            # cwd: the folder, so that no ./config/*.yaml of the caller's is picked up
            self.proc = subprocess.Popen(
                [str(self.binary), *self._arguments()], cwd=self.folder, env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        verify: Any = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else True
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qdrant exited with {self.proc.returncode} at start; see {self.folder / 'qdrant.log'}:\n"
                                   f"{self.log_tail()}")
            try:
                with httpx.Client(verify=verify, timeout=2) as http:
                    if http.get(f"{self.url}/readyz").status_code == 200:
                        self.version = http.get(f"{self.url}/", headers=self.headers()).json().get("version")
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"qdrant was not ready within {timeout:.0f}s; see {self.folder / 'qdrant.log'}:\n{self.log_tail()}")

    def headers(self) -> dict[str, str]:
        return {"api-key": self.api_key} if self.api_key else {}

    def log_tail(self, chars: int = 3000) -> str:
        path = self.folder / "qdrant.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, the clean shutdown (SIGKILL if it does not end in time)."""
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: a crash, as an OOM kill or a lost node would be."""
        if self.running:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> "QdrantServer":
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "QdrantServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- how outboxd and the tests reach it ------------------------------------------
    def env(self, api_key: str | None = None) -> dict[str, str]:
        """Environment for an `outboxd` process that uses this server."""
        env = {"QDRANT_URL": self.url, "OUTBOXD_QDRANT__GRPC_PORT": str(self.grpc_port)}
        key = api_key if api_key is not None else self.api_key
        if key:
            env["QDRANT_API_KEY"] = key
        if self.tls:
            env["OUTBOXD_QDRANT__CA_FILE"] = str(self.tls.ca)
        return env

    def client(self, *, prefer_grpc: bool = False, api_key: str | None = None, **kw: Any):
        from qdrant_client import AsyncQdrantClient

        extra: dict[str, Any] = {}
        if self.tls:
            extra["verify"] = ssl.create_default_context(cafile=str(self.tls.ca))
            extra["grpc_options"] = {"root_certificates": self.tls.ca.read_bytes()}
        return AsyncQdrantClient(url=self.url, api_key=api_key if api_key is not None else self.api_key,
                                 prefer_grpc=prefer_grpc, grpc_port=self.grpc_port, timeout=60,
                                 check_compatibility=False, **extra, **kw)

    def describe(self) -> str:
        return f"Qdrant server {self.version or '?'} ({self.binary}) at {self.url}"
