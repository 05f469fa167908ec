"""A real single-node Apache Kafka broker (KRaft, no Docker) for the tests,
driven through ops/kafka/kafka.sh (which fetches the jars from Maven Central
once and runs them with the machine's Java 17+).

    with KafkaBroker() as broker:        # starts; stops and removes its data dir at exit
        broker.bootstrap                 # "127.0.0.1:PORT"
        broker.restart()                 # same port, same data: committed messages survive

The port is picked once (a free loopback port) and the data dir is kept, so
clients reconnect to the same address after `restart()`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "kafka" / "kafka.sh"


class KafkaBrokerError(RuntimeError):
    """kafka.sh failed; the message carries what it printed (with the broker log's tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KafkaBroker:
    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        script: str | os.PathLike[str] = SCRIPT,
        env: dict[str, str] | None = None,
        timeout: float = 600.0,
    ) -> None:
        """data_dir: where the broker keeps its data, config and logs (default: a
        new tempfile.mkdtemp() folder, removed by close()). port: the PLAINTEXT
        port on 127.0.0.1 (default: a free one, chosen now and kept). timeout:
        seconds one kafka.sh call may take (the first start may fetch the jars)."""
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="outboxd-kafka-"))
        self.port = port or free_port()
        self.script = Path(script)
        self.env = env
        self.timeout = timeout
        self._running = False

    @property
    def bootstrap(self) -> str:
        """host:port for bootstrap_servers (valid across restarts)."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._running

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def _run(self, *args: str) -> str:
        env = {**os.environ, **(self.env or {})}
        try:
            proc = subprocess.run(
                ["bash", str(self.script), *args, "--data", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaBrokerError(
                f"kafka.sh {args[0]} took more than {self.timeout:.0f}s; stderr so far:\n{exc.stderr or ''}"
            ) from exc
        if proc.returncode != 0:
            raise KafkaBrokerError(
                f"kafka.sh {' '.join(args)} --data {self.data_dir} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()}\n{proc.stdout.strip()}".rstrip()
            )
        return proc.stdout

    def start(self) -> str:
        """Start (or find already running) the broker; return the bootstrap string."""
        out = self._run("start", "--port", str(self.port))
        for line in out.splitlines():
            if line.startswith("KAFKA_BOOTSTRAP_SERVERS="):
                bootstrap = line.split("=", 1)[1].strip()
                if bootstrap != self.bootstrap:
                    raise KafkaBrokerError(f"kafka.sh started the broker on {bootstrap}, expected {self.bootstrap}")
                self._running = True
                return bootstrap
        raise KafkaBrokerError(f"kafka.sh start printed no KAFKA_BOOTSTRAP_SERVERS line:\n{out}")

    def stop(self) -> None:
        """SIGTERM and wait for a clean exit (kafka.sh: up to 30 s, then SIGKILL). Keeps the data."""
        self._run("stop")
        self._running = False

    def restart(self) -> str:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the data dir if this object created it."""
        try:
            self.stop()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "KafkaBroker":
        try:
            self.start()
        except BaseException:
            try:  # kafka.sh already stopped a broker that failed to start; keep its logs to read
                self.stop()
            except KafkaBrokerError:
                pass
            if self._owns_dir and not self.log_file.exists():
                shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KafkaBroker(bootstrap={self.bootstrap!r}, data_dir={str(self.data_dir)!r}, running={self._running})"
