"""agentfs-http: HTTP in and out of an agentfs tree, through its files only.

In: a POST becomes an inbox line (`/agents/NAME/inbox`, guarded by the agent's bearer token
from the tree's `tokens`) or a plumb message (`/plumb`).  Out: each message of the plumb port
`http` is POSTed to its attr `url` (else its dst), if that host is allowed, and acknowledged
after a 2xx.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import resource
import secrets
import signal
import sys
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import h11
import trio

from agentfs.inbox import DRIVER_ID_PREFIXES
from agentfs.notify import ServiceNotifier
from plumber.message import Message, MessageError, check_attr_name

log = logging.getLogger("agentfs-http")

MAX_BODY = 1 << 20  # bytes of a request body
MAX_HEAD = 16 << 10  # bytes of a request line and headers
MAX_PLUMB_LINE = 128 << 10  # the smallest largest FUSE write: plumb/send parses each write alone
MAX_ID = 256  # bytes of an inbox id, as the tree allows
REQUEST_TIMEOUT = 30.0  # seconds to receive a whole request
IDLE_TIMEOUT = 30.0  # seconds a connection may take to send a whole request head (--idle-timeout)
MAX_CONNECTIONS = 256  # connections served at once (--max-connections); more are turned away
TURN_AWAY_TIME = 1.0  # seconds a connection past the cap gets to read its 503
ACCEPT_RETRY = 0.1  # seconds to wait when accept(2) finds no file descriptor or memory
ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept(2) errors about one connection, gone before it was accepted: skipped, as trio skips
ACCEPT_SKIP = frozenset({errno.EPERM, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN,
                         errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                         errno.EOPNOTSUPP, errno.ENETUNREACH})
SPARE_FDS = 64  # file descriptors besides sockets: listeners, the tree's files, threads'
GRACE = 5.0  # seconds the requests under way get to finish after SIGTERM
TOKEN_TTL = 1.0  # seconds a token found in the cache is trusted without reading `tokens`
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)  # seconds between tries of one delivery
TRANSIENT = frozenset({408, 425, 429})  # 4xx answers worth trying again, as 5xx are
AGENT_RE = re.compile(r"npub1[02-9ac-hj-np-z]{6,90}|[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
ID_RE = re.compile(r"[\x21-\x7e]{1,256}")  # an id a port can acknowledge: no blanks
FORWARDED = ("content-type", "user-agent")  # headers that become plumb attrs, with x-*
USER_AGENT = "agentfs-http/0.1"
UNSUPPORTED = "the Content-Type must be application/json or text/plain (curl -d sends " \
    "application/x-www-form-urlencoded: add -H 'Content-Type: application/json')"


# The one answer to a request for an inbox that its token does not open, whatever the reason:
# no such agent, no token, a bad one, or one for another agent.  Told apart, they would let
# anyone find out which agents exist; the log (the operator's) says which it was.
UNAUTHORIZED = "no such agent, or no valid bearer token for it"


class Refusal(Exception):
    """A request answered with a 4xx or 5xx and {"error": reason}; nothing was written.
    `detail` is what the log says, if the client is not to be told as much."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.status, self.reason, self.detail = status, reason, detail or reason


def unauthorized(detail: str) -> Refusal:
    return Refusal(401, UNAUTHORIZED, detail)


# What a refused write(2) to the tree means to the client: one table, as errnos are named once.
TREE_ERRORS: dict[int, tuple[int, str]] = {
    errno.EACCES: (403, "the agent is terminated"),
    errno.EINVAL: (400, "the tree refused the message (EINVAL); the store's daemon.log says why"),
    errno.ENOENT: (404, "no such agent"),
    errno.ENOTCONN: (503, "the mount is gone"),
    errno.ENODEV: (503, "the mount is gone"),
}


def tree_refusal(e: OSError, mounted: bool, what: str) -> Refusal:
    if not mounted:
        return Refusal(503, "the mount is gone")
    if e.errno == errno.ENOENT and what == "inbox":
        return unauthorized("no such agent: gone since its token was read")
    status, reason = TREE_ERRORS.get(e.errno or 0, (500, f"{what}: {e.strerror}"))
    if status == 400 and what == "plumb/send":
        reason = "no rule routes the message (EINVAL); the store's daemon.log says why"
    return Refusal(status, reason)


def write_all(path: Path, data: bytes) -> None:
    """open, write(2) until all is written, close: each write that returns is committed."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- tokens ------------------------------------------------------------------------------


@dataclass
class Tokens:
    """The tree's `tokens` file (`NPUB NAME SHA256` a line), cached: read again on a miss, and
    trusted on a hit for TOKEN_TTL seconds, so that a token changed or cleared stops working."""

    path: Path
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)  # npub or name: npub, hash
    loaded: float = -TOKEN_TTL  # trio time the last read started
    lock: trio.Lock = field(default_factory=trio.Lock)

    async def refresh(self, since: float) -> None:
        """Read the file again, unless a read that started at or after `since` did."""
        async with self.lock:
            if self.loaded >= since:
                return
            started = trio.current_time()
            await trio.to_thread.run_sync(self.load)
            self.loaded = started

    def load(self) -> None:
        hashes: dict[str, tuple[str, str]] = {}
        for line in self.path.read_text().splitlines():
            words = line.split()
            if len(words) == 3:
                npub, name, digest = words
                hashes[npub] = (npub, digest)
                if name != "-":
                    hashes[name] = (npub, digest)
        self.hashes = hashes

    def check(self, agent: str, token: str) -> str | None:
        """The agent's npub if `token` is its token, as the cache has it, else None."""
        entry = self.hashes.get(agent)
        if entry and token and hmac.compare_digest(sha256(token), entry[1]):
            return entry[0]
        return None


def bearer(headers: dict[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# -- requests ----------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request on a connection: its head, and its body read on demand."""

    conn: h11.Connection
    stream: trio.SocketStream
    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def media_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    async def body(self, limit: int) -> bytes:
        """The whole body, of 1 to `limit` bytes: a Content-Length's or chunked (h11 takes no
        other Transfer-Encoding); counted as it comes, since a chunked one has no length."""
        if "transfer-encoding" not in self.headers:
            if "content-length" not in self.headers:
                raise Refusal(411, "a Content-Length (or a chunked body) is required")
            try:
                length = int(self.headers["content-length"])
            except ValueError:
                raise Refusal(400, "a bad Content-Length") from None
            if length > limit:
                raise Refusal(413, f"the body is over {limit} bytes")
        body = bytearray()
        while True:
            event = await next_event(self.conn, self.stream)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise Refusal(413, f"the body is over {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                if not body:
                    raise Refusal(400, "the body is empty")
                return bytes(body)
            else:
                raise Refusal(400, "the body ended early")


async def next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await stream.send_all(conn.send(go_on) or b"")
        conn.receive_data(await stream.receive_some(65536))


def json_body(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Refusal(400, f"the body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise Refusal(400, "the body is not a JSON object")
    return value


def text_body(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "the body is not UTF-8 text") from None


def idempotency_key(headers: dict[str, str]) -> str | None:
    key = headers.get("idempotency-key")
    if key is not None and not ID_RE.fullmatch(key):
        raise Refusal(400, "Idempotency-Key: 1 to 256 printable ASCII characters, no blanks")
    return key


def inbox_message(exchange: Exchange, body: bytes) -> dict[str, Any]:
    """The inbox line a POST makes: a JSON object, or text; `from` http; an id always."""
    kind = exchange.media_type()
    if kind in ("", "application/json") or kind.endswith("+json"):
        message = json_body(body)
    elif kind == "text/plain":
        message = {"type": "text", "data": text_body(body)}
    else:
        raise Refusal(415, UNSUPPORTED)
    message["from"] = "http"
    key = idempotency_key(exchange.headers)
    if key is not None:
        message["id"] = key
    elif not (isinstance(message.get("id"), str) and message["id"]):
        message["id"] = secrets.token_hex(16)
    if len(message["id"].encode()) > MAX_ID:
        raise Refusal(400, f"the id is longer than {MAX_ID} bytes")
    if message["id"].startswith(DRIVER_ID_PREFIXES) or message.get("type") in ("alarm", "nostr"):
        # The timer's and the Nostr driver's: a POST could fire an alarm, or take a DM's id.
        raise Refusal(400, "ids starting alarm: or nostr:, and the types alarm and nostr, "
                           "are for the timer and Nostr drivers")
    return message


def attr_name_ok(name: str) -> bool:
    try:
        check_attr_name(name)
    except MessageError:
        return False  # a header name with ' in it, say: left out
    return True


def plumb_message(exchange: Exchange, body: bytes) -> Message:
    """The plumb message a POST makes: src http, with the request in its attrs."""
    kind = exchange.media_type()
    try:
        if kind in ("", "application/json") or kind.endswith("+json"):
            message = Message.from_json(json_body(body))
        elif kind == "text/plain":
            message = Message(type="text", data=text_body(body))
        else:
            raise Refusal(415, UNSUPPORTED)
        message.src = "http"
        attr = dict(message.attr)
        attr.update(method=exchange.method, path=exchange.target)
        for name, value in exchange.headers.items():
            if (name in FORWARDED or name.startswith("x-")) and attr_name_ok(name):
                attr[name] = value
        key = idempotency_key(exchange.headers)
        attr["id"] = key or attr.get("id") or secrets.token_hex(16)
        if not ID_RE.fullmatch(attr["id"]):
            raise Refusal(400, "attr id: 1 to 256 printable ASCII characters, no blanks")
        message.attr = attr
        message.validate()
    except MessageError as e:
        raise Refusal(400, f"not a plumb message: {e}") from None
    return message


# -- the server --------------------------------------------------------------------------


@dataclass
class Config:
    mountpoint: Path
    host: str = "127.0.0.1"
    port: int = 8080
    allow: frozenset[tuple[str, int | None]] = frozenset()
    plumb_token_file: Path | None = None
    plumb_port: str = "http"
    timeout: float = 30.0
    max_connections: int = MAX_CONNECTIONS
    idle_timeout: float = IDLE_TIMEOUT


class HttpDriver:
    """The server for inbound POSTs and the courier for the plumb port, with one lifetime."""

    def __init__(self, config: Config, notifier: ServiceNotifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or ServiceNotifier({})  # {}: an environment with no socket
        self.mp = config.mountpoint
        self.tokens = Tokens(self.mp / "tokens")
        self.stopping = False
        self._idle: set[trio.CancelScope] = set()
        self.address = ""
        self.served = 0  # connections served now, each counted until its socket is closed
        self.turning_away = 0  # connections past the cap, being answered 503

    # -- lifetime --

    async def run(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        allow = " ".join(sorted(f"{h}:{p}" if p else h for h, p in self.config.allow))
        log.info("listening on http://%s for %s; delivering plumb/%s to %s", self.address,
                 self.mp, self.config.plumb_port, allow or "nowhere (no --allow)")
        task_status.started(self.address)
        self.notifier.ready(f"listening on http://{self.address} for {self.mp}")
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as main:
                main.start_soon(self._wait_signal, main.cancel_scope)
                for listener in listeners:
                    main.start_soon(self._accept, listener, connections)
                if self.config.allow:
                    main.start_soon(Courier(self).run)
            # Stopped: no more connections; idle ones close; requests under way get GRACE.
            self.stopping = True
            self.notifier.stopping(f"stopping: {self.served} connections to finish")
            for scope in self._idle:
                scope.cancel()
            connections.cancel_scope.deadline = trio.current_time() + GRACE
        log.info("stopped")

    async def _wait_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                self.stopping = True
                scope.cancel()
                return

    # -- connections --

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept until cancelled.  The cap is applied here, in the order connections came, so
        that idle clients cannot hold every file descriptor and starve everyone else."""
        async with listener:
            while True:
                try:
                    # accept(2) itself, not listener.accept(), for the peer's address: once
                    # the peer has reset, getpeername(2) has none to tell.
                    sock, address = await listener.socket.accept()
                except OSError as e:
                    if e.errno in ACCEPT_SKIP:
                        continue
                    if e.errno not in ACCEPT_CAPACITY:
                        raise
                    log.info("accept: %s; trying again in %gs", e.strerror, ACCEPT_RETRY)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                peer = ":".join(str(p) for p in address[:2])
                if self.served < self.config.max_connections:
                    self.served += 1
                    nursery.start_soon(self._connection, trio.SocketStream(sock), peer, False)
                elif self.turning_away < self.config.max_connections:
                    self.turning_away += 1
                    nursery.start_soon(self._connection, trio.SocketStream(sock), peer, True)
                else:  # as many again are being answered 503: this one is not even that
                    log.info("%s: closed unanswered: %d connections open", peer, self.served)
                    sock.close()

    async def _connection(self, stream: trio.SocketStream, peer: str,
                          turned_away: bool) -> None:
        """Serve one connection, or turn it away.  Whatever goes wrong in it ends it alone,
        in one log line: an exception let out would take the nursery, so every other
        connection, down."""
        try:
            await (self._turn_away(stream, peer) if turned_away else self._serve(stream, peer))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.info("%s: connection lost: %s", peer, why_broken(e))
        except Exception as e:  # a bug: this connection's, not the server's
            log.info("%s: connection dropped: %s: %s", peer, type(e).__name__, e)
        finally:
            # No checkpoint between the two: a client that sees the close finds the slot free.
            if turned_away:
                self.turning_away -= 1
            else:
                self.served -= 1
            await stream.aclose()

    async def _turn_away(self, stream: trio.SocketStream, peer: str) -> None:
        """503 to a connection past the cap.  Its request, if any, is read and dropped for a
        second (closing on unread data resets, which can destroy the answer in transit)."""
        log.info("%s: turned away: %d connections open (--max-connections)", peer, self.served)
        with trio.move_on_after(TURN_AWAY_TIME):
            await self._respond(h11.Connection(h11.SERVER), stream, 503,
                                {"error": "too many connections; try again later"},
                                [("retry-after", "1")])
            await linger(stream)

    async def _serve(self, stream: trio.SocketStream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            await self._requests(conn, stream, peer)
        except h11.RemoteProtocolError as e:
            log.info("%s: bad HTTP: %s", peer, e)
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._respond(conn, stream, e.error_status_hint, {"error": str(e)})
        # Not in a `finally`: after a broken stream there is nobody to linger for.
        if conn.their_state not in (h11.IDLE, h11.DONE, h11.CLOSED, h11.ERROR):
            await linger(stream)

    async def _requests(self, conn: h11.Connection, stream: trio.SocketStream,
                        peer: str) -> None:
        """Answer requests until one leaves the connection unfit for another."""
        while not self.stopping:
            request = await self._next_request(conn, stream, peer)
            if request is None:
                return  # the client closed, took too long, or the driver stops
            with trio.move_on_after(REQUEST_TIMEOUT) as late:
                await self._exchange(conn, stream, request, peer)
            if late.cancelled_caught:
                log.info("%s %s %s: timed out", peer, request.method.decode(),
                         request.target.decode(errors="replace"))
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next_request(self, conn: h11.Connection, stream: trio.SocketStream,
                            peer: str) -> h11.Request | None:
        """The next request's head, within --idle-timeout of the connection or of the last
        answer (a slow client holds a connection, so a slot of the cap, no longer); None if
        the client closed, or did not send a whole head in time, or the driver stops."""
        event: object = None
        with trio.CancelScope() as idle:
            self._idle.add(idle)
            idle.deadline = trio.current_time() + self.config.idle_timeout
            try:
                event = await next_event(conn, stream)
            finally:
                self._idle.discard(idle)
        if idle.cancelled_caught:
            if conn.trailing_data[0] and not self.stopping:  # part of a head: say why
                log.info("%s: no whole request head in %gs", peer, self.config.idle_timeout)
                await self._respond(conn, stream, 408, {"error": "the request head took over "
                                    f"{self.config.idle_timeout:g} seconds"})
            return None
        return event if isinstance(event, h11.Request) else None

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream,
                        request: h11.Request, peer: str) -> None:
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("ascii").lower()
            text = value.decode("utf-8", errors="replace")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        exchange = Exchange(conn, stream, request.method.decode("ascii"),
                            request.target.decode("ascii", errors="replace"), headers)
        what = f"{peer} {exchange.method} {exchange.path}"
        try:
            status, answer, detail = await self._route(exchange)
        except Refusal as e:
            status, answer, detail = e.status, {"error": e.reason}, e.detail
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client's doing: the connection ends
        except Exception:  # a bug costs one request its answer, not the server its life
            log.exception("%s: internal error", what)
            status, answer, detail = 500, {"error": "internal error"}, "internal error"
        log.info("%s %d %s", what, status, detail)
        await self._respond(conn, stream, status, answer)

    async def _respond(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                       answer: dict[str, str], extra: list[tuple[str, str]] | None = None,
                       ) -> None:
        body = json.dumps(answer).encode() + b"\n"
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("server", USER_AGENT), *(extra or [])]
        if status == 401:
            headers.append(("www-authenticate", "Bearer"))  # RFC 9110 11.6.1: a 401 has one
        if status == 405:
            headers.append(("allow", "POST"))
        if self.stopping or conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))  # the rest of their body is not wanted
        response = h11.Response(status_code=status, headers=headers,
                                reason=HTTPStatus(status).phrase)
        await stream.send_all(b"".join(conn.send(event) or b"" for event in
                                       (response, h11.Data(data=body), h11.EndOfMessage())))

    # -- routes --

    async def _route(self, exchange: Exchange) -> tuple[int, dict[str, str], str]:
        if "transfer-encoding" in exchange.headers and "content-length" in exchange.headers:
            # RFC 9112 6.1: two framings of one body is how requests are smuggled past a
            # proxy that reads the other one; h11 would take the chunks, and no limit.
            raise Refusal(400, "both Content-Length and Transfer-Encoding (RFC 9112 6.1)")
        parts = exchange.path.split("/")
        inbox = len(parts) == 4 and parts[:2] == ["", "agents"] and parts[3] == "inbox"
        if not inbox and exchange.path != "/plumb":
            raise Refusal(404, f"no such path: {exchange.path}")
        if exchange.method != "POST":
            raise Refusal(405, f"{exchange.method}: only POST is served")
        return await (self._inbox(exchange, parts[2]) if inbox else self._plumb(exchange))

    async def _inbox(self, exchange: Exchange, agent: str) -> tuple[int, dict[str, str], str]:
        if not AGENT_RE.fullmatch(agent):
            raise unauthorized(f"no such agent: {agent!r} is not a name")
        npub = await self._authorize(agent, bearer(exchange.headers))
        message = inbox_message(exchange, await exchange.body(MAX_BODY))
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        await self._write(self.mp / npub / "inbox", line, "inbox")
        return 202, {"id": message["id"]}, f"queued {message['id']} for {agent}"

    async def _authorize(self, agent: str, token: str) -> str:
        """The agent's npub if `token` is its token; re-reads `tokens` when the cache says no.
        Else the one 401 for all reasons; the tree is not asked whether the agent exists."""
        now = trio.current_time()
        fresh = now - self.tokens.loaded < TOKEN_TTL
        npub = self.tokens.check(agent, token) if fresh else None
        if npub is None:
            try:
                await self.tokens.refresh(now)
            except OSError as e:
                raise await self._refusal(e, "tokens") from None
            npub = self.tokens.check(agent, token)
        if npub is not None:
            return npub
        if not token:
            raise unauthorized("missing bearer token")
        if agent not in self.tokens.hashes:
            raise unauthorized(f"no such agent, or it has no token: {agent}")
        raise unauthorized("bad token")

    async def _plumb(self, exchange: Exchange) -> tuple[int, dict[str, str], str]:
        path = self.config.plumb_token_file
        if path is None:
            raise Refusal(404, "POST /plumb is off: the driver has no --plumb-token-file")
        token = bearer(exchange.headers)
        if not token:
            raise Refusal(401, "missing bearer token")
        try:
            wanted = sha256(path.read_text().strip())
        except OSError as e:
            raise Refusal(503, f"cannot read the plumb token: {e.strerror}") from None
        if not hmac.compare_digest(sha256(token), wanted):
            raise Refusal(401, "bad token")
        message = plumb_message(exchange, await exchange.body(MAX_BODY))
        line = json.dumps(message.to_json(), separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_PLUMB_LINE:
            raise Refusal(413, f"a plumb message is at most {MAX_PLUMB_LINE} bytes as JSON")
        await self._write(self.mp / "plumb" / "send", line, "plumb/send")
        return 202, {"id": message.attr["id"]}, f"plumbed {message.attr['id']}"

    async def _write(self, path: Path, line: bytes, what: str) -> None:
        # Shielded: a write under way when SIGTERM comes completes; it is never cut short.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(write_all, path, line)
            except OSError as e:
                raise await self._refusal(e, what) from None

    async def _refusal(self, e: OSError, what: str) -> Refusal:
        return tree_refusal(e, await trio.to_thread.run_sync(os.path.ismount, self.mp), what)


def why_broken(e: Exception) -> str:
    """What broke a stream: the OSError trio wraps (Connection reset by peer, say)."""
    cause = e.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(e) or type(e).__name__


async def linger(stream: trio.SocketStream) -> None:
    """Before closing on a client still sending: our answer first, then read what it sends a
    while, so that closing with unread data (a reset) does not destroy the answer in transit."""
    with trio.move_on_after(2.0):
        await stream.send_eof()
        received = 0
        while received < 2 * MAX_BODY and (chunk := await stream.receive_some(65536)):
            received += len(chunk)


# -- outgoing ----------------------------------------------------------------------------


def parse_host(entry: str) -> tuple[str, int | None]:
    """`HOST` or `HOST:PORT` (`[V6]:PORT`) as an allowlist entry; ValueError if it is not."""
    parts = urlsplit("//" + entry.strip())
    if not parts.hostname or parts.path or parts.query or parts.username or parts.password:
        raise ValueError(f"not HOST[:PORT]: {entry!r}")
    return parts.hostname, parts.port


def post(url: str, body: bytes, headers: dict[str, bytes], timeout: float) -> int:
    """POST with the stdlib client (in a thread); the status, or an exception."""
    parts = urlsplit(url)
    client = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = client(parts.hostname or "", parts.port, timeout=timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_BODY)
        return response.status
    finally:
        conn.close()


def outgoing(message: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
    """The body (the message's data) and headers of a message's POST."""
    data = str(message.get("data", ""))
    attr = message.get("attr") or {}
    kind = attr.get("content-type")
    if not kind:
        try:
            kind = "application/json" if isinstance(json.loads(data), dict | list) else None
        except ValueError:
            kind = None
    headers = {"Content-Type": (kind or "text/plain; charset=utf-8").encode(),
               "Idempotency-Key": str(message["id"]).encode(), "User-Agent": USER_AGENT.encode()}
    for key, name in (("src", "X-Agentfs-Src"), ("type", "X-Agentfs-Type")):
        if message.get(key):
            headers[name] = str(message[key]).encode()
    return data.encode("utf-8", "surrogateescape"), headers


class Courier:
    """Reads the plumb port, one message at a time, and POSTs each until a 2xx or a refusal.

    The message stays leased to the open port file while it is tried again, so it comes back
    to the queue only if the driver dies; it is acknowledged after a 2xx, or when it can never
    be delivered (no url, a host not allowed, a 4xx), which is logged.
    """

    def __init__(self, driver: HttpDriver) -> None:
        self.config = driver.config
        self.port = driver.mp / "plumb" / driver.config.plumb_port

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                fd = await trio.to_thread.run_sync(os.open, self.port, os.O_RDWR)
            except OSError as e:
                if failures == 0:
                    log.info("cannot open %s: %s; trying every few seconds", self.port,
                             e.strerror)
                failures += 1
                await trio.sleep(BACKOFF[min(failures, 3)])
                continue
            if failures:
                log.info("reading %s", self.port)
            failures = 0
            try:
                await self._drain(fd)
            except OSError as e:
                os.close(fd)  # hands back whatever was read and not acknowledged
                log.info("%s: %s; opening it again", self.port, e.strerror)
                failures = 1
                await trio.sleep(BACKOFF[0])
            # Cancelled, the fd stays open until the process exits: a read thread left
            # behind may still use it, and must not find its number reused.

    async def _drain(self, fd: int) -> None:
        while True:
            line = await trio.to_thread.run_sync(read_line, fd, abandon_on_cancel=True)
            if not line:
                continue  # nothing queued for 1 s: read again
            try:
                message = json.loads(line)
                ident = str(message["id"])
            except (ValueError, KeyError, TypeError):
                log.info("%s: not a message, left unacknowledged: %.200r", self.port, line)
                continue
            if await self._deliver(message):
                try:
                    await trio.to_thread.run_sync(os.write, fd, f"ack {ident}\n".encode())
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    # Kept leased to this open file, so not delivered again until a restart.
                    log.info("cannot acknowledge %s (EINVAL): an id with a blank?", ident)

    async def _deliver(self, message: dict[str, Any]) -> bool:
        """Try until delivered or refused for good; True to acknowledge."""
        ident = message["id"]
        # Its attr `url`, else its dst: an agent's message `to` a URL keeps it as dst.
        url = str((message.get("attr") or {}).get("url") or message.get("dst") or "")
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            host = port = None
        if parts.scheme not in ("http", "https") or not host:
            log.info("refused %s: no http(s) url in attr url or dst: %r", ident, url)
            return True
        port = port or (443 if parts.scheme == "https" else 80)
        if (host, port) not in self.config.allow and (host, None) not in self.config.allow:
            log.info("refused %s: %s:%d is not allowed (url %s)", ident, host, port, url)
            return True
        body, headers = outgoing(message)
        attempt = 0
        while True:
            try:
                status = await trio.to_thread.run_sync(
                    post, url, body, headers, self.config.timeout, abandon_on_cancel=True)
            except (ValueError, http.client.InvalidURL) as e:
                # http.client will not write the request: a path that is not ASCII, or has
                # a blank, a CR in a header.  For ever so; let out, it would end the driver.
                log.info("refused %s: cannot be sent: %s (url %r)", ident, e, url)
                return True
            except (OSError, http.client.HTTPException) as e:
                why = str(e) or type(e).__name__
            else:
                if 200 <= status < 300:
                    log.info("delivered %s to %s: %d", ident, url, status)
                    return True
                if status < 500 and status not in TRANSIENT:
                    log.info("rejected %s by %s: %d; dropped", ident, url, status)
                    return True
                why = f"status {status}"
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            log.info("retry %s to %s in %gs: %s", ident, url, delay, why)
            await trio.sleep(delay)
            attempt += 1


def read_line(fd: int) -> bytes:
    """One message from a port (it may take several reads); b"" if none came in 1 s."""
    line = os.read(fd, 65536)
    while line and not line.endswith(b"\n"):
        more = os.read(fd, 65536)
        if not more:
            raise OSError(errno.EIO, "a port message ended early")
        line += more
    return line


# -- the command -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    ap = argparse.ArgumentParser(
        prog="agentfs-http", description="HTTP in and out of an agentfs tree.")
    ap.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                    help="where to listen (default 127.0.0.1:8080; port 0 picks one)")
    ap.add_argument("--allow", action="append", default=[], metavar="HOST[:PORT]",
                    help="a host outgoing POSTs may go to (any port unless given); repeatable")
    ap.add_argument("--allow-file", type=Path, metavar="FILE",
                    help="more allowed hosts, one a line; # starts a comment")
    ap.add_argument("--plumb-token-file", type=Path, metavar="FILE",
                    help="the bearer token for POST /plumb (off without it)")
    ap.add_argument("--plumb-port", default="http", metavar="PORT",
                    help="the plumb port whose messages are POSTed (default http)")
    ap.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="for each outgoing POST (default 30)")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                    help="connections served at once; more are answered 503 "
                         f"(default {MAX_CONNECTIONS})")
    ap.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SECONDS",
                    help="for a whole request head, from the connection or the last answer "
                         f"(default {IDLE_TIMEOUT:g})")
    ap.add_argument("mountpoint", type=Path)
    args = ap.parse_args(argv)

    def fail(message: str) -> NoReturn:
        ap.error(message)

    try:
        host, port = parse_host(args.listen)
    except ValueError as e:
        fail(f"--listen: {e}")
    entries = list(args.allow)
    if args.allow_file:
        try:
            text = args.allow_file.read_text()
        except OSError as e:
            fail(f"--allow-file: {e}")
        entries += [ln.split("#")[0].strip() for ln in text.splitlines()]
    try:
        allow = frozenset(parse_host(entry) for entry in entries if entry.strip())
    except ValueError as e:
        fail(f"--allow: {e}")
    if args.max_connections < 1:
        fail("--max-connections: at least 1")
    if not args.idle_timeout > 0:
        fail("--idle-timeout: more than 0 seconds")
    if args.plumb_token_file and not os.access(args.plumb_token_file, os.R_OK):
        fail(f"--plumb-token-file: cannot read {args.plumb_token_file}")
    if not (args.mountpoint / "tokens").exists():
        fail(f"{args.mountpoint}: not a mounted agentfs tree (no tokens file)")
    return Config(args.mountpoint.resolve(), host, 8080 if port is None else port, allow,
                  args.plumb_token_file, args.plumb_port, args.timeout, args.max_connections,
                  args.idle_timeout)


def raise_fd_limit(max_connections: int) -> None:
    """Make room for the sockets the cap allows, served and turned away (as many again), up
    to the hard limit: a soft limit of 1024 would otherwise be the cap, with accept failing."""
    wanted = 2 * max_connections + SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        log.info("only %d file descriptors (RLIMIT_NOFILE) for --max-connections %d, which "
                 "wants %d: past them, connections wait to be accepted", new, max_connections,
                 wanted)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s agentfs-http[%(process)d] %(message)s")
    notifier = ServiceNotifier()
    config = parse_args(argv)
    raise_fd_limit(config.max_connections)
    try:
        trio.run(HttpDriver(config, notifier).run)
    except OSError as e:  # only listening raises outside the nurseries
        message = f"cannot listen on {config.host}:{config.port}: {e.strerror or e}"
        log.error("%s", message)
        notifier.status(message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
