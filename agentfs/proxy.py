"""The egress proxy's HTTP/1.1 wire, with h11: one client connection's requests, each
forwarded, tunnelled or refused.  What may go where is `egress.Egress`'s to say; this module
moves the bytes, within bounds: header sizes, body sizes (streamed, never held whole), idle
time, requests per connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
import trio

from . import caps, errors
from .caps import Endpoint
from .inbox import rfc3339_now

if TYPE_CHECKING:
    from .egress import Egress
    from .factotum import Secret

MAX_HEAD = 32 * 1024  # request or response line and headers
MAX_BODY_UP = 64 << 20  # a request body
MAX_BODY_DOWN = 1 << 30  # a response body
MAX_TUNNEL = 4 << 30  # bytes through one CONNECT, both ways
MAX_REQUESTS = 100  # requests on one kept-alive client connection
IDLE = 30.0  # seconds without a byte before a connection is dropped
CHUNK = 65536
REALM = 'Basic realm="agentfs egress"'
# Headers of one hop only (RFC 9110 7.6.1), never passed on; nor the client's Host, which
# the proxy writes from the target, nor Expect, which it answers itself.
HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate",
               b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
               b"host", b"expect"}

Headers = list[tuple[bytes, bytes]]


class Refusal(Exception):
    """An answer the proxy makes itself: a status, a sentence for the agent, its log line."""

    def __init__(self, status: int, why: str, headers: Headers | None = None) -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.headers = headers or []


@dataclass
class Target:
    """What a request asks for: a tunnel to host:port, or a request for host[:port]."""

    host: str
    port: int | None  # None: not given (absolute-form without a port)
    path: bytes  # origin-form for the upstream request; b"" for CONNECT
    connect: bool


@dataclass
class Plan:
    """Where the proxy goes for a request, and how."""

    host: str
    port: int
    tls: bool  # the proxy speaks TLS to the host (a secret's request)
    secret: Secret | None = None
    value: str | None = None
    address: str = ""  # the host's address, resolved once, checked, and connected to


@dataclass
class Exchange:
    """One request's line in the agent's log."""

    index: int
    method: str
    host: str = ""
    port: int = 0
    status: int = 0
    up: int = 0
    down: int = 0
    tls: bool = False
    secret: str | None = None
    error: str | None = None
    counted: bool = False

    def entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"time": rfc3339_now(), "event": "egress",
                                 "method": self.method, "host": self.host, "port": self.port,
                                 "status": self.status, "up": self.up, "down": self.down}
        if self.tls:
            entry["tls"] = True
        if self.secret is not None:
            entry["secret"] = self.secret
        if self.error is not None:
            entry["error"] = self.error
        return entry


def parse_target(request: h11.Request) -> Target:
    """The host and port of a CONNECT or an absolute-form request; 400 for anything else."""
    raw = request.target.decode("ascii", errors="replace")
    if request.method == b"CONNECT":
        endpoint = _endpoint(raw)
        if endpoint.port is None:
            raise Refusal(400, f"CONNECT {raw[:200]}: a port is required (HOST:PORT)")
        return Target(endpoint.host, endpoint.port, b"", True)
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() != "http":
        why = "use CONNECT for https" if scheme.lower() == "https" else \
            "this is a forward proxy: ask for an absolute URL (http://host/path) or CONNECT"
        raise Refusal(400, f"{request.method.decode(errors='replace')} {raw[:200]}: {why}")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise Refusal(400, "a URL with user information is not passed on")
    endpoint = _endpoint(authority)
    path = path if path.startswith("/") else "/" + path
    return Target(endpoint.host, endpoint.port, path.encode("ascii", errors="replace"), False)


def _endpoint(text: str) -> Endpoint:
    try:
        return caps.parse_endpoint(text)
    except errors.FsError as e:
        raise Refusal(400, e.message) from None


def _listed(headers: Headers) -> set[bytes]:
    """The headers a Connection header names: hop-by-hop too."""
    return {token.strip().lower() for name, value in headers if name == b"connection"
            for token in value.split(b",")}


def _passed(headers: Headers) -> Headers:
    listed = _listed(headers)
    return [(n, v) for n, v in headers if n not in HOP_HEADERS and n not in listed]


def _authority(host: str, port: int, tls: bool) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return (shown if port == (443 if tls else 80) else f"{shown}:{port}").encode()


def upstream_headers(request: h11.Request, plan: Plan) -> Headers:
    """The client's headers as the host gets them: no hop headers, its Host, the secret."""
    headers = [(b"host", _authority(plan.host, plan.port, plan.tls))]
    passed = _passed(list(request.headers))
    if plan.secret is not None and plan.value is not None:
        name, value = plan.secret.field(plan.value)
        passed = [(n, v) for n, v in passed if n != name.lower().encode()]
        passed.append((name.encode(), value.encode()))
    headers += passed
    if any(n == b"transfer-encoding" for n, _v in request.headers):
        headers.append((b"transfer-encoding", b"chunked"))  # h11 reframes the body
    headers.append((b"connection", b"close"))  # one upstream connection per request
    return headers


class Client:
    """One client connection: requests in turn, each forwarded, tunnelled or refused."""

    def __init__(self, egress: Egress, stream: trio.SocketStream) -> None:
        self.egress = egress
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.method = b""
        self.token = ""

    # -- the wire --------------------------------------------------------------------------

    async def next_event(self) -> Any:
        # Each round reads at least a byte (or the end), and h11 refuses a head over
        # MAX_HEAD: the loop ends long before its bound.
        for _ in range(MAX_HEAD + CHUNK):
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(IDLE):
                data = await self.stream.receive_some(CHUNK)
            self.conn.receive_data(data)
        raise h11.RemoteProtocolError("no complete event")

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(IDLE):
                await self.stream.send_all(data)

    def alive(self) -> bool:
        return self.egress.tokens.holder(self.token) is not None

    # -- requests --------------------------------------------------------------------------

    async def serve(self, busy: bool = False) -> None:
        """Requests until the connection ends; `busy`, the first is told 503 and it ends."""
        for _ in range(MAX_REQUESTS):
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError as e:
                await self.refuse(Refusal(e.error_status_hint, f"bad request: {e}"))
                return
            if not isinstance(event, h11.Request):
                return  # the client closed the connection
            if head_size(event) > MAX_HEAD:  # h11 bounds only a head that came in pieces
                await self.refuse(Refusal(431, f"a request head over {MAX_HEAD} bytes"))
                return
            if busy:
                await self.refuse(Refusal(503, "the proxy has as many connections as it "
                                               "serves at once: try again later"))
                return
            if not await self.request(event):
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def request(self, request: h11.Request) -> bool:
        """Answer one request; whether the connection may carry another."""
        self.method = request.method
        index = self._authorize(request)
        if index is None:
            await self.refuse(Refusal(407, "the proxy needs the token of a running tick "
                                           "(Proxy-Authorization)",
                                      [(b"proxy-authenticate", REALM.encode())]))
            return False
        exchange = Exchange(index, request.method.decode("ascii", errors="replace"))
        try:
            target = parse_target(request)
            exchange.host, exchange.port = target.host, target.port or 0
            record = self.egress.agent(index)
            if record is None:
                raise Refusal(407, "the agent is gone")
            plan = self.egress.plan(record, target)
            exchange.port, exchange.tls = plan.port, plan.tls
            exchange.secret = plan.secret.name if plan.secret else None
            self.egress.check(record, plan)
            await self.egress.resolve(plan)
            self.egress.reserve(index)
            exchange.counted = True
            upstream = await self.egress.open(plan)
            async with upstream:
                if target.connect:
                    await self.tunnel(upstream, exchange)
                    return False
                return await self.forward(upstream, request, target, plan, exchange)
        except Refusal as refusal:
            exchange.status, exchange.error = refusal.status, refusal.why
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     trio.TooSlowError, OSError):
                await self.refuse(refusal)
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                h11.ProtocolError, OSError) as e:
            # Mid-way: a side went, idled, or broke HTTP.  If the client still waits for an
            # answer it gets one; the line says what happened; the connection closes.
            exchange.error = f"broken off: {e or type(e).__name__}"
            status = 504 if isinstance(e, trio.TooSlowError) else \
                e.error_status_hint if isinstance(e, h11.RemoteProtocolError) else 502
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                exchange.status = status
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         trio.TooSlowError, h11.ProtocolError, OSError):
                    await self.refuse(Refusal(status, exchange.error))
            return False
        finally:
            await self.egress.record(exchange)

    def _authorize(self, request: h11.Request) -> int | None:
        for name, value in request.headers:
            if name != b"proxy-authorization":
                continue
            scheme, _, encoded = value.partition(b" ")
            if scheme.lower() != b"basic":
                return None
            try:
                user_pass = base64.b64decode(encoded.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            _user, _, token = user_pass.partition(":")
            index = self.egress.tokens.holder(token)
            if index is not None:
                self.token = token
            return index
        return None

    async def refuse(self, refusal: Refusal) -> None:
        """The proxy's own answer, and then the connection closes; too late, it just closes."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b"" if self.method == b"HEAD" else \
            f"agentfs egress: {refusal.why}\n".encode("utf-8", errors="replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                   *refusal.headers]
        await self.send(h11.Response(status_code=refusal.status, headers=headers,
                                     reason=_reason(refusal.status)))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    # -- forwarding ------------------------------------------------------------------------

    async def forward(self, upstream: trio.abc.Stream, request: h11.Request, target: Target,
                      plan: Plan, exchange: Exchange) -> bool:
        """Pass the request on and its answer back, streaming both bodies."""
        origin = Upstream(upstream)
        await origin.send(h11.Request(method=request.method, target=target.path,
                                      headers=upstream_headers(request, plan)))
        if self.conn.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        # Each round passes at least a byte of the body, at most MAX_BODY_UP in all.
        for _ in range(MAX_BODY_UP + 2):
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                await origin.send(h11.EndOfMessage())
                break
            if not isinstance(event, h11.Data):
                raise trio.BrokenResourceError("the client went in the middle of its request")
            exchange.up += len(event.data)
            if exchange.up > MAX_BODY_UP:
                raise Refusal(413, f"a request body over {MAX_BODY_UP} bytes")
            await origin.send(h11.Data(data=event.data))
        try:
            response = await origin.response()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.TooSlowError) as e:
            raise Refusal(502 if not isinstance(e, trio.TooSlowError) else 504,
                          f"{plan.host}:{plan.port}: no valid answer ({e or 'timed out'})"
                          ) from None
        exchange.status = response.status_code
        await self.send(h11.Response(status_code=response.status_code,
                                     headers=_passed(list(response.headers)),
                                     reason=response.reason))
        for _ in range(MAX_BODY_DOWN + 2):
            event = await origin.next_event()
            if isinstance(event, h11.EndOfMessage):
                await self.send(h11.EndOfMessage())
                return True
            if not isinstance(event, h11.Data):
                raise trio.BrokenResourceError("the host closed in the middle of its answer")
            exchange.down += len(event.data)
            if exchange.down > MAX_BODY_DOWN:
                raise trio.BrokenResourceError(f"an answer over {MAX_BODY_DOWN} bytes")
            await self.send(h11.Data(data=event.data))
        return False

    # -- tunnels ---------------------------------------------------------------------------

    async def tunnel(self, upstream: trio.abc.Stream, exchange: Exchange) -> None:
        """CONNECT: 200, then bytes both ways until both ends close, or it idles."""
        event = await self.next_event()
        if not isinstance(event, h11.EndOfMessage):
            raise Refusal(400, "CONNECT takes no body")
        await self.send(h11.Response(status_code=200, headers=[],
                                     reason=b"Connection established"))
        exchange.status = 200
        first, _closed = self.conn.trailing_data
        with trio.CancelScope(deadline=trio.current_time() + IDLE) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, self.stream, upstream, scope, exchange, True,
                                   bytes(first))
                nursery.start_soon(self._pump, upstream, self.stream, scope, exchange, False,
                                   b"")

    async def _pump(self, source: trio.abc.Stream, sink: trio.abc.Stream,
                    scope: trio.CancelScope, exchange: Exchange, up: bool,
                    first: bytes) -> None:
        try:
            if first:
                exchange.up += len(first)
                await sink.send_all(first)
            # Each round moves at least a byte, at most MAX_TUNNEL in all.
            for _ in range(MAX_TUNNEL):
                data = await source.receive_some(CHUNK)
                if not data:
                    if isinstance(sink, trio.abc.HalfCloseableStream):
                        await sink.send_eof()  # the other way may still have bytes to go
                    else:
                        scope.cancel()
                    return
                if up:
                    exchange.up += len(data)
                else:
                    exchange.down += len(data)
                if exchange.up + exchange.down > MAX_TUNNEL or not self.alive():
                    scope.cancel()  # too much, or its tick ended: the tunnel goes
                    return
                scope.deadline = trio.current_time() + IDLE
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()


class Upstream:
    """The proxy's client side of one upstream connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(IDLE):
                await self.stream.send_all(data)

    async def next_event(self) -> Any:
        for _ in range(MAX_HEAD + CHUNK):  # as for Client.next_event
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(IDLE):
                try:
                    data = await self.stream.receive_some(CHUNK)
                except trio.BrokenResourceError:
                    data = b""  # a TLS host that closes without close_notify: the end
            self.conn.receive_data(bytes(data))
        raise h11.RemoteProtocolError("no complete event")

    async def response(self) -> h11.Response:
        """The final answer's head (informational 1xx answers are dropped)."""
        for _ in range(16):
            event = await self.next_event()
            if isinstance(event, h11.Response | h11.InformationalResponse) and \
                    head_size(event) > MAX_HEAD:
                raise h11.RemoteProtocolError(f"an answer head over {MAX_HEAD} bytes")
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise h11.RemoteProtocolError("the host closed without an answer")
        raise h11.RemoteProtocolError("too many informational answers")


def head_size(event: h11.Request | h11.Response | h11.InformationalResponse) -> int:
    """About the bytes of a head as it came: its line and its headers."""
    line = len(event.target) if isinstance(event, h11.Request) else len(event.reason)
    return line + sum(len(name) + len(value) + 4 for name, value in event.headers)


def _reason(status: int) -> bytes:
    with contextlib.suppress(ValueError):
        return http.HTTPStatus(status).phrase.encode()
    return b""
