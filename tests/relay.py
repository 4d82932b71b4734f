"""A real Nostr relay for tests, and a raw NIP-01 client (trio-websocket) to talk to it.

`Relay(directory).start()` runs `nostr-relay serve` as a child process on a free port and
returns once the relay completes a websocket handshake; `stop()` ends it, `restart()` brings it
back on the same port over the same database. The `relay` fixture gives a started relay and
always stops it. `RelayConnection` speaks NIP-01 as plain JSON arrays; `publish` and `query`
are one-connection conveniences around it. The relay executable is $AGENTFS_NOSTR_RELAY if
set, else the `nostr-relay` script beside the running Python, else the one on PATH.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from agentfs.nostr.event import Event, from_dict

__all__ = ["WAIT", "Relay", "RelayConnection", "publish", "query", "relay", "relay_executable",
           "talk"]

WAIT = 10  # seconds any one exchange with the relay may take

# Our events are stamped up to two days in the past (NIP-59) and gift wraps exceed the stock
# 4096-character content limit; everything else is nostr-relay's default validation.
_CONFIG = """\
DEBUG: false
relay_name: agentfs test relay
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{db}
  validators:
    - nostr_relay.validators.is_not_too_large
    - nostr_relay.validators.is_signed
    - nostr_relay.validators.is_recent
    - nostr_relay.validators.is_not_hellthread
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: warning
authentication:
  enabled: false
max_event_size: 262144
"""


def relay_executable() -> str:
    """The nostr-relay command to run (see the module docstring for the search order)."""
    override = os.environ.get("AGENTFS_NOSTR_RELAY")
    if override:
        return override
    beside = Path(sys.executable).parent / "nostr-relay"
    if beside.exists():
        return str(beside)
    found = shutil.which("nostr-relay")
    if found is None:
        raise RuntimeError("nostr-relay is not installed (pip install nostr-relay)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def websocket_handshake(port: int, timeout: float = 1.0) -> bool:
    """Whether a websocket opening handshake on 127.0.0.1:`port` gets `101 Switching Protocols`.

    The connection is then closed with a close frame, so the relay sees a clean goodbye.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request.encode())
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(1024)
                if not chunk:
                    return False
                reply += chunk
            if reply.split(b"\r\n", 1)[0].split(b" ")[1:2] != [b"101"]:
                return False
            # A masked close frame with no payload: FIN+close, mask bit, length 0, mask key.
            sock.sendall(b"\x88\x80" + os.urandom(4))
            return True
    except OSError:
        return False


class Relay:
    """One nostr-relay process serving ws://127.0.0.1:`port` from `directory`/nostr.sqlite3.

    The directory also holds the relay's config.yaml and relay.log (its stdout and stderr,
    appended across restarts). The port is chosen on the first start and kept after.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the relay is not running")
        return self.process.pid

    @property
    def db(self) -> Path:
        return self.directory / "nostr.sqlite3"

    @property
    def log(self) -> Path:
        return self.directory / "relay.log"

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-size:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30.0) -> Relay:
        """Run the relay and return once it accepts websocket connections."""
        if self.process is not None:
            raise RuntimeError(f"the relay already runs as pid {self.process.pid}")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        config = self.directory / "config.yaml"
        config.write_text(_CONFIG.format(db=self.db, port=self.port))
        with open(self.log, "ab") as log:
            # Its own session: a ^C meant for pytest must not reach the relay before stop() does.
            self.process = subprocess.Popen(
                [relay_executable(), "--config", str(config), "serve", "--use-uvicorn"],
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll with websocket handshakes until one succeeds; fail if the relay exits first."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not websocket_handshake(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay on port {self.port} not ready after {timeout}s:\n"
                                   f"{self.log_tail()}")
            try:
                # Waits a few ms between handshakes, and returns at once if the relay died.
                code = self.process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"relay exited with status {code} before it was ready:\n"
                               f"{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if the relay has not exited after `timeout` s; reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()

    def restart(self, timeout: float = 30.0) -> Relay:
        """Stop and start again on the same port over the same database."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Relay:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    """A started relay with its store in tmp_path/relay; stopped after the test, pass or fail."""
    with Relay(tmp_path / "relay") as started:
        yield started


# -- a raw client --------------------------------------------------------------------------


class RelayConnection:
    """One websocket to a relay; messages are NIP-01 JSON arrays."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, *message: Any) -> None:
        await self.ws.send_message(json.dumps(list(message)))

    async def receive(self) -> list[Any]:
        message = json.loads(await self.ws.get_message())
        assert isinstance(message, list) and message, message
        return message

    async def publish(self, event: Event) -> list[Any]:
        """Send EVENT; return the relay's ["OK", id, accepted, reason]."""
        await self.send("EVENT", event.to_dict())
        while (reply := await self.receive())[0] != "OK":
            pass  # a NOTICE, say
        return reply

    async def subscribe(self, sub: str, *filters: dict[str, Any]) -> list[Event]:
        """Send REQ; return the stored events the relay sends before EOSE."""
        await self.send("REQ", sub, *filters)
        stored = []
        while (reply := await self.receive())[:2] != ["EOSE", sub]:
            if reply[:2] == ["EVENT", sub]:
                stored.append(from_dict(reply[2]))
        return stored

    async def query(self, *filters: dict[str, Any]) -> list[Event]:
        """The stored events matching `filters`, the subscription closed after EOSE."""
        stored = await self.subscribe("q", *filters)
        await self.send("CLOSE", "q")
        return stored


def talk(url: str, scenario: Callable[[RelayConnection], Awaitable[None]]) -> None:
    """Run `scenario` on a fresh connection to `url`, in trio, bounded by WAIT seconds."""

    async def main() -> None:
        with trio.fail_after(WAIT):
            async with open_websocket_url(url) as ws:
                await scenario(RelayConnection(ws))

    trio.run(main)


def publish(url: str, *events: Event) -> None:
    """Publish `events` over one connection; each must be accepted (OK true)."""

    async def scenario(conn: RelayConnection) -> None:
        for event in events:
            ok = await conn.publish(event)
            assert ok[:3] == ["OK", event.id, True], ok

    talk(url, scenario)


def query(url: str, *filters: dict[str, Any]) -> list[Event]:
    """The stored events matching any of `filters`, in the order the relay sends them."""
    found: list[Event] = []

    async def scenario(conn: RelayConnection) -> None:
        found.extend(await conn.query(*filters))

    talk(url, scenario)
    return found
