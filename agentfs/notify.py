"""sd_notify(3) for the daemon and the drivers: READY, STATUS, STOPPING and WATCHDOG datagrams
to the service manager's $NOTIFY_SOCKET, and nothing at all where it is not set."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

import trio

log = logging.getLogger("agentfs")


def _socket_address(value: str) -> bytes | None:
    """The address $NOTIFY_SOCKET names: a path, or an abstract name written with '@'.
    Anything else (systemd also knows vsock:) is not for us."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def _watchdog_interval(usec: str, pid: str) -> float | None:
    """Seconds between pings: half the timeout, as sd_watchdog_enabled(3) advises; None when
    no watchdog is asked of this process."""
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (the one that execed us, say)
    try:
        timeout = int(usec)
    except ValueError:
        return None
    return timeout / 2e6 if timeout > 0 else None


class ServiceNotifier:
    """The service manager's notification socket, taken out of the environment as
    sd_notify's unset_environment does, so the programs we start cannot speak for us."""

    def __init__(self, environ: MutableMapping[str, str] = os.environ) -> None:
        given = environ.pop("NOTIFY_SOCKET", "")
        self.address = _socket_address(given)
        self.watchdog_interval = _watchdog_interval(environ.pop("WATCHDOG_USEC", ""),
                                                    environ.pop("WATCHDOG_PID", ""))
        if given and self.address is None:
            log.warning("NOTIFY_SOCKET=%s: not a path or an @name; not notifying", given)
        if self.address is None:
            self.watchdog_interval = None
        self._socket: socket.socket | None = None
        self._failed = False
        self.stopping_sent = False

    def send(self, *fields: str) -> None:
        """One datagram of `KEY=value` lines.  A failure is logged once and then ignored:
        the service manager's absence must not stop the service."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the trio loop: a full queue means a manager that is not reading.
            self._socket.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as e:
            if not self._failed:
                log.warning("NOTIFY_SOCKET: cannot notify the service manager: %s",
                            e.strerror or e)
            self._failed = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        """STOPPING=1, once, however many ways the service is told to stop."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.send("STOPPING=1", f"STATUS={status}")

    async def keep_watchdog(self) -> None:
        """Ping the watchdog from the trio loop until cancelled: a loop that hangs stops
        pinging, and the service manager restarts the service."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
