"""The plumber in the tree: rules kept in the store, and messages routed by them.

A message goes to an agent's inbox when its port names an agent, or else into the
port's queue, which drivers read from `plumb/PORT`.  A queued message handed to a
reader stays queued, leased to that open file, until the reader writes `ack ID`; a
reader that closes its file (or dies) without acknowledging hands the message back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from plumber import Message, MessageError, NoRoute, Rules, RulesError, parse_rules, route
from plumber.message import split_wire

from . import errors
from .inbox import Message as InboxMessage
from .inbox import stamp_id
from .nostr.bridge import ATTRS as NOSTR_ATTRS
from .nostr.bridge import PORT as NOSTR_PORT
from .store import Txn, scan_prefix

RULES_KEY = b"plumb-rules"
PORT_WAIT = 1.0  # seconds a port read waits for a message before it returns empty
# The parser's complaint about a rule set cut short, as text written line by line is.
INCOMPLETE = "must have patterns and actions"


def port_key(port: str, seq: int) -> bytes:
    return port.encode() + b"\0" + seq.to_bytes(8, "big")


def parse_send(data: bytes) -> list[Message]:
    """What was written to plumb/send: JSON objects one a line, or Plan 9 wire messages."""
    if data.lstrip().startswith(b"{"):
        try:
            return [Message.from_json_line(line) for line in data.splitlines() if line.strip()]
        except MessageError as e:
            raise errors.invalid(f"plumb/send: {e}") from None
    messages, rest = [], data
    while rest:
        try:
            parsed = split_wire(rest)
        except MessageError as e:
            raise errors.invalid(f"plumb/send: {e}") from None
        if parsed is None:
            raise errors.invalid("plumb/send: an incomplete plumb message")
        message, rest = parsed
        messages.append(message)
    return messages


def from_outbox(message: InboxMessage) -> Message:
    """An agent's sent message as a plumb message, so the rules can route it."""
    data = message.get("data", "")
    attr = {"id": str(message["id"]), "hops": str(message.get("hops", 0))}
    for name in ("in_reply_to", *NOSTR_ATTRS):
        if message.get(name):
            attr[name] = str(message[name])
    return Message(src=str(message.get("from", "")), dst=str(message.get("to") or ""), wdir="",
                   type=str(message.get("type", "text")), attr=attr,
                   data=data if isinstance(data, str) else json.dumps(data))


def to_inbox(message: Message) -> InboxMessage:
    """A plumb message as an inbox entry: its fields become the entry's."""
    entry: InboxMessage = {"type": message.type or "text", "data": message.data}
    if message.src:
        entry["from"] = message.src
    for name in ("src", "dst", "wdir"):
        if getattr(message, name):
            entry[name] = getattr(message, name)
    if message.attr:
        entry["attr"] = dict(message.attr)
        if message.attr.get("id"):
            entry["id"] = message.attr["id"]
        if message.attr.get("hops", "").isdigit():
            entry["hops"] = int(message.attr["hops"])
    return entry


async def _set_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@dataclass
class Delivered:
    """Where one transaction's routed messages went: told to the engine after commit."""

    agents: set[int] = field(default_factory=set)
    ports: set[str] = field(default_factory=set)


class Plumbing:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.db = self.store.db["ports"]
        self._arrived: dict[str, trio.Event] = {}
        self._leases: dict[bytes, int] = {}  # queue key -> the file handle it was read by
        self._closing = trio.Event()
        with self.store.read() as txn:
            raw = txn.get(RULES_KEY, db=self.store.db["meta"])
        self.rules = parse_rules(bytes(raw).decode()) if raw else Rules()

    # -- rules -----------------------------------------------------------------------

    def rules_text(self) -> bytes:
        return self.rules.text.encode()

    @staticmethod
    def check_rules(data: bytes, complete: bool = True) -> None:
        """EINVAL for a syntax error; with complete=False, one more text could still mend
        (a last rule set still waiting for its actions) passes."""
        try:
            parse_rules(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise errors.invalid("plumb/rules: not UTF-8 text") from None
        except RulesError as e:
            if complete or INCOMPLETE not in str(e):
                raise errors.invalid(f"plumb/rules: {e}") from None

    async def set_rules(self, data: bytes) -> None:
        """Replace the rules as a whole; a syntax error changes nothing."""
        self.check_rules(data)
        rules = parse_rules(data.decode("utf-8"))

        def apply(txn: Txn) -> None:
            txn.put(RULES_KEY, rules.text.encode(), db=self.store.db["meta"])

        await self.runtime.committer.commit(apply)
        self.rules = rules

    def ports(self) -> list[str]:
        """The ports with files: those the rules name that are not agents."""
        with self.store.read() as txn:
            return [p for p in self.rules.ports if self.runtime.resolve(txn, p) is None]

    # -- routing (inside a write transaction) ----------------------------------------------

    def route(self, txn: Txn, message: Message, delivered: Delivered,
              sender: int | None = None) -> str:
        """Deliver `message` by the rules; returns the port.  NoRoute becomes EINVAL.

        `sender` is the agent whose outbox it comes from: the one that signs it, if the
        rules send it to Nostr.
        """
        # An agent is a port too: the one a dst names is all routing needs to know of them.
        dst_is_agent = bool(message.dst) and self.runtime.resolve(txn, message.dst) is not None
        try:
            decision = route(self.rules, message, ports=[message.dst] if dst_is_agent else [],
                             addresses=True)
        except NoRoute as e:
            raise errors.invalid(f"plumb: {e.reason}") from None
        index = self.runtime.resolve(txn, decision.port) if decision.port else None
        if index is not None:
            if not self.runtime.accept(txn, index, to_inbox(decision.message)):
                raise errors.denied(f"plumb: agent {decision.port} is terminated")
            delivered.agents.add(index)
        elif decision.port == NOSTR_PORT:
            self.enqueue(txn, NOSTR_PORT,
                         self.runtime.nostr.outgoing(txn, decision.message, sender))
            delivered.ports.add(NOSTR_PORT)
        elif decision.port:
            self.enqueue(txn, decision.port, decision.message)
            delivered.ports.add(decision.port)
        else:
            raise errors.invalid("plumb: the rule starts a program; agentfs runs none")
        return decision.port

    def enqueue(self, txn: Txn, port: str, message: Message) -> None:
        """Queue `message` on `port` for the drivers, past the rules."""
        seq = self.store.bump_counter(txn, None, b"port:" + port.encode())
        entry = message.to_json()
        entry["id"] = message.attr.get("id") or ""
        stamp_id(entry)
        txn.put(port_key(port, seq), json.dumps(entry, separators=(",", ":")).encode(),
                db=self.db)

    async def send(self, data: bytes) -> None:
        """Route every message written to plumb/send, all or nothing."""
        messages = parse_send(data)
        delivered = Delivered()

        def apply(txn: Txn) -> None:
            for message in messages:
                self.route(txn, message, delivered)

        await self.runtime.committer.commit(apply)
        self.announce(delivered)

    def announce(self, delivered: Delivered) -> None:
        for index in delivered.agents:
            self.runtime.engine.notify(index)
        for port in delivered.ports:
            self._arrived.pop(port, trio.Event()).set()

    # -- ports -----------------------------------------------------------------------

    def _queued(self, port: str) -> Iterator[tuple[bytes, bytes]]:
        prefix = port.encode() + b"\0"
        with self.store.read() as txn:
            for rest, raw in scan_prefix(txn, self.db, prefix):
                yield prefix + rest, raw

    async def take(self, port: str, fh: int) -> bytes:
        """The next queued message not leased to a reader, as one JSON line.

        Waits for one at most PORT_WAIT seconds, then returns nothing (an empty read: read
        again).  The kernel cannot interrupt a FUSE read the daemon holds, so an unbounded
        wait would leave a killed reader, and the unmount, hanging.
        """
        with trio.move_on_after(PORT_WAIT):
            while not self._closing.is_set():
                for key, raw in self._queued(port):
                    if key not in self._leases:
                        self._leases[key] = fh
                        return raw + b"\n"
                arrived = self._arrived.setdefault(port, trio.Event())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_set_when, arrived, nursery.cancel_scope)
                    nursery.start_soon(_set_when, self._closing, nursery.cancel_scope)
        return b""

    def close(self) -> None:
        """The mount is going: readers waiting on ports get an empty read now."""
        self._closing.set()

    async def ack(self, port: str, data: bytes, fh: int) -> None:
        """`ack ID` lines: those messages were delivered; they leave the queue for good."""
        ids = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            words = line.split()
            if not words:
                continue
            if len(words) != 2 or words[0] != "ack":
                raise errors.invalid(f"plumb/{port}: expected `ack ID`, got {line.strip()!r}")
            ids.append(words[1])
        keys: dict[str, bytes] = {}
        for key, raw in self._queued(port):
            message_id = json.loads(raw)["id"]
            if message_id not in keys or self._leases.get(key) == fh:
                keys[message_id] = key
        unknown = [i for i in ids if i not in keys]
        if unknown:
            raise errors.invalid(f"plumb/{port}: no queued message has id {unknown[0]!r}")

        def apply(txn: Txn) -> None:
            for message_id in ids:
                txn.delete(keys[message_id], db=self.db)

        await self.runtime.committer.commit(apply)
        for message_id in ids:
            self._leases.pop(keys[message_id], None)

    def release(self, port: str, fh: int) -> None:
        """What a closed file read but did not acknowledge goes back to the queue."""
        returned = [key for key, holder in self._leases.items() if holder == fh]
        for key in returned:
            del self._leases[key]
        if returned:
            self._arrived.pop(port, trio.Event()).set()
