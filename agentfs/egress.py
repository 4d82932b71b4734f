"""The egress proxy: the one way out of a tick, through the agent's `net` capabilities.

An HTTP/1.1 forward proxy on trio.  Each running tick gets a random token, and its
environment `HTTP_PROXY=http://agent:TOKEN@127.0.0.1:PORT` (see `tick_environment`); a
request without a live token is 407.  A host the agent does not hold `net` for is 403, with
the ctl line that would grant it; a request past `max_daily_api_calls` is 429.  `CONNECT`
tunnels bytes (TLS end to end, the client's); an absolute-form `GET http://host/path` is
forwarded, and when the agent holds a secret for that host the proxy itself speaks TLS to
the host, adds the secret's header, and relays the answer: the tick never holds the value.
Every request the proxy answers for an agent is one `egress` line in the agent's log.

This module decides (who, where, how many) and serves; proxy.py moves the bytes.  At most
MAX_CONNECTIONS client connections are served at once.  A host name that resolves to a
loopback, private or link-local address is refused, so DNS cannot point a granted name
inside; only a granted address is reached as it is (`grant net 127.0.0.1:8443`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import h11
import trio

from . import budget, caps
from .caps import Endpoint
from .factotum import Secret
from .inbox import rfc3339_now
from .proxy import Client, Exchange, Plan, Refusal, Target
from .store import AgentRecord, Txn

if TYPE_CHECKING:
    from .runtime import Runtime
    from .ticks import RunningTick

log = logging.getLogger("agentfs")

MAX_CONNECTIONS = 256  # client connections at once, all agents
CONNECT_TIMEOUT = 10.0  # seconds to resolve, connect and finish a TLS handshake
USER = "agent"


def tick_environment(token: str, port: int) -> dict[str, str]:
    """The variables that send a tick's HTTP clients through the proxy with its token."""
    url = f"http://{USER}:{token}@127.0.0.1:{port}"
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = ""  # nothing goes around it: it is the only way out
    env["NODE_USE_ENV_PROXY"] = "1"  # node 24's fetch reads HTTP_PROXY only with this
    return env


def upstream_context(ca_file: str | None = None) -> ssl.SSLContext:
    """How the proxy checks the hosts it speaks TLS to: the system's CAs, and `ca_file`'s."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def check_ca(ca_file: str) -> None:
    """ValueError or OSError unless `ca_file` is an absolute path to CA certificates."""
    if not ca_file.startswith("/"):
        raise ValueError(f"proxy_ca={ca_file}: an absolute path is needed")
    upstream_context(ca_file)


def _digest(token: str) -> bytes:
    # Looked up by hash: a dict probe then says nothing about how much of a token matched.
    return hashlib.sha256(token.encode()).digest()


@dataclass
class _Holder:
    index: int
    alive: Callable[[], bool] | None
    active: Callable[[], bool] | None = None  # when False, refused for now, not forgotten


class Tokens:
    """Who may use the proxy: one random token per running tick, for that tick's agent."""

    def __init__(self) -> None:
        self._holders: dict[bytes, _Holder] = {}

    def issue(self, index: int, alive: Callable[[], bool] | None = None,
              active: Callable[[], bool] | None = None) -> str:
        """A new token for agent `index`, good until `revoke` (or until `alive` says no),
        and while `active` says so."""
        self._prune()
        token = secrets.token_urlsafe(32)
        self._holders[_digest(token)] = _Holder(index, alive, active)
        return token

    def revoke(self, token: str) -> None:
        self._holders.pop(_digest(token), None)

    def holder(self, token: str) -> int | None:
        """The agent whose live token this is, or None."""
        key = _digest(token)
        holder = self._holders.get(key)
        if holder is None:
            return None
        if holder.alive is not None and not holder.alive():
            del self._holders[key]
            return None
        if holder.active is not None and not holder.active():
            return None
        return holder.index

    def _prune(self) -> None:
        """Drop the tokens of ticks that ended: the table holds about one per running tick."""
        for key, holder in list(self._holders.items()):
            if holder.alive is not None and not holder.alive():
                del self._holders[key]


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Egress:
    """The proxy of one daemon: its tokens, its listeners and what it has in flight."""

    def __init__(self, runtime: Runtime, proxy_ca: str | None = None) -> None:
        self.runtime = runtime
        self.tokens = Tokens()
        self.port: int | None = None
        # Set before `Runtime.run` to serve elsewhere (in a sandbox's network namespace):
        # else the proxy listens on 127.0.0.1 at a port of the system's choosing.
        self.listeners: list[trio.SocketListener] | None = None
        self.ssl = upstream_context(proxy_ca)
        self._connections = 0
        self._in_flight: dict[int, int] = {}  # api calls reserved, not yet committed

    # -- tokens: the lead's spawner calls these at a tick's start and end -------------------

    def issue(self, index: int, alive: Callable[[], bool] | None = None,
              active: Callable[[], bool] | None = None) -> str:
        return self.tokens.issue(index, alive, active)

    def revoke(self, token: str) -> None:
        self.tokens.revoke(token)

    def environment(self, tick: RunningTick) -> dict[str, str]:
        """A running tick's proxy variables: a token that dies with the tick."""
        if self.port is None:
            return {}
        token = self.issue(tick.index, alive=lambda: not tick.finished)
        return tick_environment(token, self.port)

    def served_environment(self, index: int,
                           active: Callable[[], bool]) -> tuple[dict[str, str], str | None]:
        """A served program's proxy variables and its token: good until revoked (when the
        program ends), and only while one of its ticks runs."""
        if self.port is None:
            return {}, None
        token = self.issue(index, active=active)
        return tick_environment(token, self.port), token

    # -- serving ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = self.listeners or await trio.open_tcp_listeners(0, host="127.0.0.1")
        await self.serve(listeners, task_status=task_status)

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the proxy on `listeners` until cancelled."""
        if self.port is None:
            for listener in listeners:
                if listener.socket.family in (socket.AF_INET, socket.AF_INET6):
                    self.port = int(listener.socket.getsockname()[1])
                    break
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        # One over the cap is still read (for as long as IDLE allows), to be told why not.
        busy = self._connections >= MAX_CONNECTIONS
        self._connections += 1
        try:
            await Client(self, stream).serve(busy)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                h11.ProtocolError, OSError):
            pass  # the client went, or broke the protocol: nothing to answer
        except Exception:  # noqa: BLE001 - a bug must not end the mount (serve_listeners would)
            log.exception("egress: connection failed")
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    # -- deciding --------------------------------------------------------------------------

    def agent(self, index: int) -> AgentRecord | None:
        with self.runtime.store.read() as txn:
            return self.runtime.store.agent(txn, index)

    def plan(self, record: AgentRecord, target: Target) -> Plan:
        """Where to go for `target`: over TLS, with its value, if the agent holds a secret
        for the host (to the URL's port, else 443), else as asked (else port 80)."""
        plan = Plan(target.host, target.port or 80, tls=False)
        if not target.connect:
            found = self._secret_for(record, target.host)
            if found is not None:
                plan.secret, plan.value = found
                plan.tls, plan.port = True, target.port or 443
        return plan

    def check(self, record: AgentRecord, plan: Plan) -> None:
        """403, naming the grant it lacks, unless the agent holds `net` for the plan."""
        if not any(e.allows(plan.host, plan.port) for e in caps.endpoints(record)):
            raise Refusal(403, self._not_granted(record, plan))

    def _secret_for(self, record: AgentRecord, host: str) -> tuple[Secret, str] | None:
        """The first secret (by name) that the agent holds for `host`, and its value."""
        factotum = self.runtime.secrets
        with self.runtime.store.read() as txn:
            names = [name for name in caps.secrets(record)
                     if (s := factotum.secret(txn, name)) is not None and s.host == host]
        for name in names:
            found = factotum.reveal(name)
            if found is not None:
                return found
        return None

    def _not_granted(self, record: AgentRecord, plan: Plan) -> str:
        asked = Endpoint(plan.host, plan.port)
        grant = Endpoint(plan.host, None if plan.port in caps.DEFAULT_PORTS else plan.port)
        who = record.name or record.npub
        return (f"{asked} is not granted to agent {who}; its owner grants it with\n"
                f"    echo 'grant net {grant}' > {self.runtime.engine.mountpoint}/{who}/ctl")

    def reserve(self, index: int) -> None:
        """Count one api call in flight, or 429 if the day's `max_daily_api_calls` is used.

        The record is read here, with no await between reading it and counting: a request
        that commits meanwhile is seen in the store or in flight, never in neither."""
        record = self.agent(index)
        if record is None:
            raise Refusal(407, "the agent is gone")
        budget.roll_day(record)
        used = int(record.usage.get("used_daily_api_calls", 0))
        tick = self.runtime.engine.running.get(index)
        declared = tick.overlay.charges.get("used_daily_api_calls", 0) if tick else 0
        in_flight = self._in_flight.get(index, 0)
        most = int(budget.limit(record, "max_daily_api_calls"))
        if used + declared + in_flight + 1 > most:
            reset = budget.next_reset()
            wait = max(1, int((reset - datetime.now(UTC)).total_seconds()))
            shown = reset.isoformat().replace("+00:00", "Z")
            raise Refusal(429, f"max_daily_api_calls {most} is used up today "
                               f"({used + declared} calls); calls may go on at {shown}",
                          [(b"retry-after", str(wait).encode())])
        self._in_flight[index] = in_flight + 1

    async def resolve(self, plan: Plan) -> None:
        """The address to connect to: a granted address as it is; a name's, if public."""
        if caps.is_address(plan.host):
            plan.address = plan.host  # an exact grant: the owner named this very address
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                infos = await trio.socket.getaddrinfo(plan.host, plan.port,
                                                      type=socket.SOCK_STREAM)
        except (OSError, trio.TooSlowError) as e:
            raise Refusal(502, f"{plan.host}: cannot resolve the name ({e})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        inside = [a for a in addresses if not public(a)]
        if inside or not addresses:
            raise Refusal(403, f"{plan.host} resolves to {', '.join(inside) or 'nothing'}, "
                               "not a public address; to reach an address inside, its owner "
                               "grants that address itself (grant net ADDRESS:PORT)")
        plan.address = addresses[0]

    async def open(self, plan: Plan) -> trio.abc.Stream:
        """A connection to the planned host: TCP, and TLS over it for a secret's request."""
        where = f"{plan.host}:{plan.port}"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(plan.address, plan.port)
        except (OSError, trio.TooSlowError) as e:
            raise Refusal(502, f"{where}: cannot connect ({e})") from None
        if not plan.tls:
            return tcp
        stream = trio.SSLStream(tcp, self.ssl, server_hostname=plan.host,
                                https_compatible=True)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as e:
            await trio.aclose_forcefully(stream)
            cause = e.__cause__ or e
            raise Refusal(502, f"{where}: TLS failed ({cause})") from None
        return stream

    async def record(self, exchange: Exchange) -> None:
        """The request's log line, and its api call counted, in one commit."""
        runtime = self.runtime

        def apply(txn: Txn) -> bool:
            record = runtime.store.agent(txn, exchange.index)
            if record is None:
                return False
            warned = False
            if exchange.counted:
                budget.roll_day(record)
                record.usage["used_daily_api_calls"] = \
                    int(record.usage.get("used_daily_api_calls", 0)) + 1
            runtime.log.append(txn, exchange.index, exchange.entry())
            if exchange.counted:
                warned = runtime.warn_budget(txn, record, rfc3339_now())
                runtime.store.put_agent(txn, record)
            return warned and record.awake

        try:
            # A request that happened is counted, even as the daemon stops (but the
            # committer may have stopped first: not for ever).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                if await runtime.committer.commit(apply):
                    runtime.engine.notify(exchange.index)
        finally:
            if exchange.counted:
                left = self._in_flight.get(exchange.index, 1) - 1
                if left > 0:
                    self._in_flight[exchange.index] = left
                else:
                    self._in_flight.pop(exchange.index, None)
