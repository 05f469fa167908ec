"""sd_notify(3) without libsystemd: READY=1, STATUS=, STOPPING=1 and WATCHDOG=1
as datagrams to $NOTIFY_SOCKET (a path, or '@name' for an abstract socket).

Without NOTIFY_SOCKET (not started by systemd as Type=notify) every call is a
no-op. A failed send is logged at debug and never raised: the daemon's work does
not depend on systemd hearing about it.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        elif address and not address.startswith("/"):
            log.debug("NOTIFY_SOCKET is neither a path nor @abstract; not notifying", extra={"socket": address})
            address = None
        self.address = address
        self.watchdog_interval = self._watchdog_interval(env) if address else None
        self._socket: socket.socket | None = None
        self._stopping = False

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when
        unset, invalid, or meant for another process (WATCHDOG_PID)."""
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        pid = env.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid.strip() != str(os.getpid())):
            return None
        return usec / 2 / 1_000_000

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one notification ("KEY=value" lines); True if it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)  # a full receive queue must not block the event loop
                self._socket = sock
            self._socket.sendto(message.encode("utf-8", "replace"), self.address)
            return True
        except OSError as exc:
            log.debug("systemd notification not sent", extra={"notification": message[:40], "error": str(exc)})
            return False

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """STOPPING=1, once (later calls send nothing)."""
        if self._stopping:
            return False
        self._stopping = True
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
