"""agentfs-nostr(8): carries Nostr events between relays and an agentfs tree, and nothing more.

Events for the tree's agents go from the relays into their inboxes; signed events queued on the
port plumb/nostr go out to the relays. Keys stay in the daemon: this driver signs nothing and
decrypts nothing, it only checks that what it carries is intact.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import json
import logging
import os
import random
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from agentfs.identity import npub_decode
from agentfs.nostr.event import Event, check, from_dict, from_json

__all__ = [
    "Backoff",
    "Driver",
    "Outcome",
    "PendingOks",
    "RelayLink",
    "SeenIds",
    "Tree",
    "inbox_line",
    "main",
    "matches",
    "outcome_of",
    "parse_relays",
    "recipients",
    "subscription_filters",
]

log = logging.getLogger("agentfs-nostr")
T = TypeVar("T")

CARRIED_KINDS = (1, 4)          # text notes and NIP-04 DMs, stamped with their true time
GIFT_WRAP_KIND = 1059           # NIP-17/59: stamped up to two days in the past
GIFT_WRAP_LOOKBACK = 2 * 24 * 60 * 60
MARGIN = 300                    # s subscribed before `since`: clock skew, late publishers
CONNECT_TIMEOUT = 10.0          # s for TCP, TLS and the websocket handshake
OK_TIMEOUT = 30.0               # s a relay may take to answer EVENT (refusals are slowed)
PING_EVERY, PING_TIMEOUT = 60.0, 20.0
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 30.0
STABLE = 60.0                   # s connected after which the reconnect backoff starts over
SEEN_CAPACITY = 65536           # event ids remembered to drop copies from other relays
WINDOW = 16                     # events awaiting OK on one connection
PUBLISHING = 32                 # port messages being published at once
FILTERS_KEPT = 4                # subscriptions per connection whose events are still taken
RETRY_PREFIXES = ("rate-limited:", "error:")
# Inbox write errors that mean "never": the event is logged and skipped. Others are retried.
REFUSALS = {
    errno.EINVAL: "the daemon refused it (not for this agent, or it cannot open it)",
    errno.EACCES: "the agent is terminated",
    errno.ENOENT: "no such agent",
}


# -- pure parts ------------------------------------------------------------------------------


def parse_relays(text: str) -> tuple[list[str], list[str]]:
    """(relay URLs in order, without repeats; lines that are not ws:// or wss:// URLs).

    Blank lines and lines starting with # are skipped.
    """
    good: list[str] = []
    bad: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = urlsplit(line)
            ok = parts.scheme in ("ws", "wss") and bool(parts.hostname) and " " not in line
            parts.port  # noqa: B018  (raises ValueError for a bad port)
        except ValueError:
            ok = False
        if not ok:
            bad.append(line)
        elif line not in good:
            good.append(line)
    return good, bad


def subscription_filters(pubkeys: Iterable[str], since: int) -> list[dict[str, Any]]:
    """The REQ filters for events to `pubkeys` (hex) from `since` (unix s) on.

    Gift wraps get two more days, since their created_at is randomised that far back.
    """
    tagged = sorted(set(pubkeys))
    return [
        {"kinds": list(CARRIED_KINDS), "#p": tagged, "since": max(0, since - MARGIN)},
        {"kinds": [GIFT_WRAP_KIND], "#p": tagged,
         "since": max(0, since - GIFT_WRAP_LOOKBACK - MARGIN)},
    ]


def matches(flt: Mapping[str, Any], event: Event) -> bool:
    """Whether `event` passes one NIP-01 filter (ids, authors, kinds, #x, since, until)."""
    if "ids" in flt and event.id not in flt["ids"]:
        return False
    if "authors" in flt and event.pubkey not in flt["authors"]:
        return False
    if "kinds" in flt and event.kind not in flt["kinds"]:
        return False
    if "since" in flt and event.created_at < flt["since"]:
        return False
    if "until" in flt and event.created_at > flt["until"]:
        return False
    for key, wanted in flt.items():
        if len(key) == 2 and key[0] == "#" and not any(
                len(tag) > 1 and tag[0] == key[1] and tag[1] in wanted for tag in event.tags):
            return False
    return True


def recipients(event: Event, local: Mapping[str, str]) -> list[str]:
    """The npubs of the local agents (`local`: hex -> npub) that `event`'s p tags name."""
    found: list[str] = []
    for tag in event.tags:
        if len(tag) > 1 and tag[0] == "p" and tag[1] in local and local[tag[1]] not in found:
            found.append(local[tag[1]])
    return found


def inbox_line(event: Event) -> bytes:
    """The inbox entry that hands `event` to the daemon: one JSON line."""
    entry = {"type": "nostr", "id": f"nostr:{event.id}", "event": event.to_dict()}
    return (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class SeenIds:
    """The ids of the last `capacity` events taken, oldest forgotten first."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def discard(self, event_id: str) -> None:
        self._ids.pop(event_id, None)


class Outcome(enum.Enum):
    """What a relay said to one EVENT."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"   # it had it already: as good as accepted
    REFUSED = "refused"       # for good: invalid, blocked, pow, restricted, ...
    RETRY = "retry"           # rate-limited: or error:, worth another try later
    NO_ANSWER = "no answer"   # not connected, connection lost, or no OK in time

    @property
    def delivered(self) -> bool:
        return self in (Outcome.ACCEPTED, Outcome.DUPLICATE)


def outcome_of(accepted: object, reason: object) -> Outcome:
    """Classify an ["OK", id, accepted, reason] answer.

    "duplicate:" counts as delivered whatever the flag: nostr-relay says false for it.
    """
    text = reason if isinstance(reason, str) else ""
    if text.startswith("duplicate:"):
        return Outcome.DUPLICATE
    if accepted is True:
        return Outcome.ACCEPTED
    if text.startswith(RETRY_PREFIXES):
        return Outcome.RETRY
    return Outcome.REFUSED


@dataclass
class PendingOk:
    """One EVENT sent on a connection and not yet answered."""

    event_id: str
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome = Outcome.NO_ANSWER
    reason: str = ""

    def resolve(self, outcome: Outcome, reason: str) -> None:
        if not self.done.is_set():
            self.outcome, self.reason = outcome, reason
            self.done.set()


class PendingOks:
    """The EVENTs of one connection awaiting their OK, oldest first.

    An OK names its event by id, but some relays (nostr-relay 1.14) refuse with an empty id:
    such an OK, or one whose id is not awaited, answers the oldest event awaiting one. Relays
    answer a connection's messages in order, so that is the event it was about; one that
    does not can misattribute a refusal, and the event left unanswered then times out and is
    published again on a new connection.
    """

    def __init__(self) -> None:
        self._waiting: list[PendingOk] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, event_id: str) -> PendingOk:
        pending = PendingOk(event_id)
        self._waiting.append(pending)
        return pending

    def discard(self, pending: PendingOk) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(pending)

    def answer(self, event_id: str, outcome: Outcome, reason: str) -> PendingOk | None:
        """Resolve the event this OK is about; None if nothing awaits one."""
        if not self._waiting:
            return None
        ids = [pending.event_id for pending in self._waiting]
        pending = self._waiting.pop(ids.index(event_id) if event_id in ids else 0)
        pending.resolve(outcome, reason)
        return pending

    def fail_all(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, []
        for pending in waiting:
            pending.resolve(Outcome.NO_ANSWER, reason)


class Backoff:
    """Exponential delays from `first` to `cap` seconds, each drawn in [d/2, d]."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self.first


# -- the tree --------------------------------------------------------------------------------


class MountGone(Exception):
    """The mount under the driver is gone (ENOTCONN) or not a mount any more."""


class Tree:
    """The files of the mount the driver uses. Every method blocks: call them in a thread."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.relays = mountpoint / "nostr" / "relays"
        self.since = mountpoint / "nostr" / "since"
        self.port = mountpoint / "plumb" / "nostr"

    def check_mounted(self) -> None:
        if not os.path.ismount(self.mountpoint):
            raise MountGone(f"{self.mountpoint} is not mounted")

    def read_relays(self) -> str:
        try:
            return self.relays.read_text()
        except FileNotFoundError:
            return ""

    def read_since(self) -> int | None:
        """The saved time, or None if there is none (no file, empty, or not a number)."""
        try:
            text = self.since.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return int(text) if text else None
        except ValueError:
            log.info("nostr/since: %r is not a time; starting from now", text)
            return None

    def write_since(self, value: int) -> None:
        fd = os.open(self.since, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"%d\n" % value)
        finally:
            os.close(fd)

    def local_agents(self) -> dict[str, str]:
        """hex pubkey -> npub of the agents of the tree (their directories; names are links)."""
        agents: dict[str, str] = {}
        for name in os.listdir(self.mountpoint):
            if name.startswith("npub1"):
                try:
                    agents[npub_decode(name).hex()] = name
                except ValueError:
                    continue
        return agents

    def append_inbox(self, npub: str, line: bytes) -> None:
        """One write(2) of `line` to the agent's inbox: when it returns, the entry is durable."""
        fd = os.open(self.mountpoint / npub / "inbox", os.O_WRONLY | os.O_APPEND)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.EIO, "short write to inbox")
        finally:
            os.close(fd)


def _fatal(exc: OSError) -> bool:
    return exc.errno == errno.ENOTCONN


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking tree call in a worker thread; ENOTCONN means the mount is gone."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        if _fatal(exc):
            raise MountGone(f"the mount is gone: {exc}") from exc
        raise


class Port:
    """plumb/nostr open for reading and writing: one message a line, acks on the same file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    async def read_message(self) -> bytes:
        """The next message's line; waits across the port's empty (1 s) reads."""
        while b"\n" not in self._buffer:
            started = trio.current_time()
            # A read the daemon holds cannot be interrupted: on cancel, leave the thread.
            chunk = await trio.to_thread.run_sync(os.read, self.fd, 1 << 20,
                                                  abandon_on_cancel=True)
            if not chunk and trio.current_time() - started < 0.5:
                await trio.sleep(0.5)  # an empty read should take 1 s: do not spin
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    async def ack(self, message_id: str) -> None:
        try:
            await in_thread(os.write, self.fd, f"ack {message_id}\n".encode())
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Not queued any more: acknowledged through another open file of the port.
            log.info("plumb/nostr: ack %s refused: %s", message_id, exc)


# -- relays ----------------------------------------------------------------------------------


class RelayLink:
    """One relay: keeps a connection (reconnecting with backoff), the subscription for the
    tree's agents on it, and its EVENTs awaiting OK."""

    def __init__(self, url: str, driver: Driver, caught_up: int) -> None:
        self.url = url
        self.driver = driver
        self.cancel_scope = trio.CancelScope()
        self.ws: WebSocketConnection | None = None
        # Everything this relay had from before this time (unix s) is in the inboxes.
        self.caught_up = caught_up
        self.live = False              # the current subscription is past its EOSE
        self.sub_id: str | None = None
        self.filters: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.awaiting = PendingOks()
        self.window = trio.Semaphore(WINDOW)
        self._subs = 0
        self._session_scope: trio.CancelScope | None = None
        self._resubscribe = trio.Event()
        self._closed_by_relay = False

    async def run(self) -> None:
        with self.cancel_scope:
            backoff = Backoff()
            while True:
                started = trio.current_time()
                try:
                    await self._session()
                except* (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError,
                         trio.BrokenResourceError, ValueError) as group:
                    log.info("%s: %s", self.url, _describe(group))
                if trio.current_time() - started > STABLE:
                    backoff.reset()
                delay = backoff.next()
                log.info("%s: reconnecting in %.1fs", self.url, delay)
                await trio.sleep(delay)

    def resubscribe(self) -> None:
        self._resubscribe.set()

    def drop(self, why: str) -> None:
        """End the current connection (run() reconnects)."""
        if self._session_scope is not None:
            log.info("%s: dropping the connection: %s", self.url, why)
            self._session_scope.cancel()

    async def _session(self) -> None:
        """One connection, until it fails or is dropped."""
        with trio.CancelScope() as scope:
            self._session_scope = scope
            try:
                async with trio.open_nursery() as nursery:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        ws = await connect_websocket_url(nursery, self.url)
                    self.ws = ws
                    log.info("%s: connected", self.url)
                    self.driver.link_up()
                    try:
                        nursery.start_soon(self._keep_subscribed, ws)
                        nursery.start_soon(self._keep_alive, ws)
                        await self._read(ws)
                    finally:
                        self.ws, self.live, self.sub_id = None, False, None
                        self.filters.clear()
                        self.awaiting.fail_all("connection lost")
                        nursery.cancel_scope.cancel()
                        with trio.CancelScope(shield=True), trio.move_on_after(1):
                            await ws.aclose()
            finally:
                self._session_scope = None

    async def _send(self, ws: WebSocketConnection, *message: Any) -> None:
        await ws.send_message(json.dumps(list(message), ensure_ascii=False,
                                         separators=(",", ":")))

    async def _read(self, ws: WebSocketConnection) -> None:
        while True:
            raw = await ws.get_message()
            try:
                message = json.loads(raw)
            except ValueError:
                log.info("%s: not JSON: %.80r", self.url, raw)
                continue
            if not isinstance(message, list) or not message or not isinstance(message[0], str):
                log.info("%s: not a relay message: %.80r", self.url, raw)
                continue
            await self._handle(message)

    async def _handle(self, message: list[Any]) -> None:
        verb = message[0]
        if verb == "EVENT" and len(message) >= 3:
            await self.driver.receive(self, message[1], message[2])
        elif verb == "EOSE" and len(message) >= 2:
            if message[1] == self.sub_id and not self.live:
                self.live = True
                log.info("%s: subscription %s caught up", self.url, self.sub_id)
        elif verb == "OK" and len(message) >= 3:
            event_id = message[1] if isinstance(message[1], str) else ""
            reason = message[3] if len(message) > 3 and isinstance(message[3], str) else ""
            if self.awaiting.answer(event_id, outcome_of(message[2], reason), reason) is None:
                log.info("%s: OK for no event awaiting one: %.120r", self.url, message)
        elif verb == "CLOSED" and len(message) >= 2:
            log.info("%s: relay closed subscription %s: %s", self.url, message[1],
                     message[2] if len(message) > 2 else "")
            if message[1] == self.sub_id:
                self.sub_id, self.live = None, False
                self._closed_by_relay = True
                self._resubscribe.set()
        elif verb == "NOTICE":
            log.info("%s: notice: %s", self.url, message[1] if len(message) > 1 else "")
        else:
            log.info("%s: ignored %s", self.url, json.dumps(message)[:120])

    async def _keep_subscribed(self, ws: WebSocketConnection) -> None:
        """Subscribe, and again whenever the agents change or the relay closes it."""
        backoff = Backoff()
        while True:
            self._resubscribe = trio.Event()
            await self._subscribe(ws)
            await self._resubscribe.wait()
            if self._closed_by_relay:
                self._closed_by_relay = False
                await trio.sleep(backoff.next())

    async def _subscribe(self, ws: WebSocketConnection) -> None:
        old, self.sub_id, self.live = self.sub_id, None, False
        if old is not None:
            await self._send(ws, "CLOSE", old)
        pubkeys = list(self.driver.agents)
        if not pubkeys:
            self.live = True  # nothing to wait for
            return
        self._subs += 1
        sub = f"agentfs-{self._subs}"
        filters = subscription_filters(pubkeys, self.caught_up)
        self.filters[sub] = filters
        while len(self.filters) > FILTERS_KEPT:
            self.filters.popitem(last=False)
        self.sub_id = sub
        await self._send(ws, "REQ", sub, *filters)
        log.info("%s: subscribed %s for %d agent(s) from %d (gift wraps from %d)", self.url,
                 sub, len(pubkeys), filters[0]["since"], filters[1]["since"])

    async def _keep_alive(self, ws: WebSocketConnection) -> None:
        while True:
            await trio.sleep(PING_EVERY)
            with trio.move_on_after(PING_TIMEOUT) as timer:
                await ws.ping()
            if timer.cancelled_caught:
                self.drop(f"no pong in {PING_TIMEOUT:.0f}s")
                return

    async def publish(self, event: Event) -> tuple[Outcome, str]:
        """Send EVENT and wait for the relay's answer (NO_ANSWER if there is none)."""
        ws = self.ws
        if ws is None:
            return Outcome.NO_ANSWER, "not connected"
        async with self.window:
            if self.ws is not ws:
                return Outcome.NO_ANSWER, "connection lost"
            pending = self.awaiting.add(event.id)
            try:
                await self._send(ws, "EVENT", event.to_dict())
            except ConnectionClosed:
                self.awaiting.discard(pending)
                return Outcome.NO_ANSWER, "connection lost"
            with trio.move_on_after(OK_TIMEOUT):
                await pending.done.wait()
                return pending.outcome, pending.reason
            # Its OK may still come, empty-id: start afresh rather than misattribute it.
            self.drop(f"no OK for {event.id} in {OK_TIMEOUT:.0f}s")
            return Outcome.NO_ANSWER, "no OK in time"


def _describe(group: BaseExceptionGroup[Any]) -> str:
    parts = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            parts.append(_describe(exc))
        else:
            parts.append(f"{type(exc).__name__}: {exc}".rstrip(": "))
    return "; ".join(parts)


# -- the driver ------------------------------------------------------------------------------


class Driver:
    """Relays in, inboxes out; the port in, relays out; `since` kept in the tree."""

    def __init__(self, tree: Tree, extra_relays: Sequence[str] = (), poll: float = 2.0) -> None:
        self.tree = tree
        self.extra_relays = list(extra_relays)
        self.poll = poll
        self.agents: dict[str, str] = {}
        self.links: dict[str, RelayLink] = {}
        self.seen = SeenIds()
        self.since_written = 0     # nostr/since: where a relay added now starts (unix s)
        self.undelivered = 0       # events taken and not yet written to every inbox
        self._relays_text: str | None = None
        self._link_up = trio.Event()
        self._deliveries_in, self._deliveries_out = trio.open_memory_channel[
            tuple[Event, str]](256)
        self._nursery: trio.Nursery | None = None

    # - the whole ------------------------------------------------------------------------

    async def run(self) -> None:
        await in_thread(self.tree.check_mounted)
        saved = await in_thread(self.tree.read_since)
        self.since_written = saved if saved is not None else int(time.time())
        log.info("starting on %s from %d%s", self.tree.mountpoint, self.since_written,
                 "" if saved is not None else " (now: nostr/since is empty)")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.refresh()
            nursery.start_soon(self._watch)
            nursery.start_soon(self._deliver)
            nursery.start_soon(self._serve_port)

    async def _watch(self) -> None:
        while True:
            await trio.sleep(self.poll)
            await self.refresh()
            await self.save_since()

    async def refresh(self) -> None:
        """Follow the tree: its agents, and the relays in nostr/relays."""
        await in_thread(self.tree.check_mounted)
        agents = await in_thread(self.tree.local_agents)
        if agents != self.agents:
            added = len(set(agents) - set(self.agents))
            self.agents = agents
            log.info("%d local agent(s), %d new", len(agents), added)
            for link in self.links.values():
                link.resubscribe()
        text = await in_thread(self.tree.read_relays)
        if text != self._relays_text:
            self._relays_text = text
            urls, bad = parse_relays(text)
            for line in bad:
                log.info("nostr/relays: not a ws:// or wss:// URL, ignored: %r", line)
            self.set_relays(urls + [u for u in self.extra_relays if u not in urls])

    def set_relays(self, urls: Sequence[str]) -> None:
        assert self._nursery is not None
        for url in list(self.links):
            if url not in urls:
                log.info("%s: no longer a relay: disconnecting", url)
                self.links.pop(url).cancel_scope.cancel()
        for url in urls:
            if url not in self.links:
                link = RelayLink(url, self, self.since_written)
                self.links[url] = link
                self._nursery.start_soon(link.run)

    def link_up(self) -> None:
        self._link_up.set()
        self._link_up = trio.Event()

    # - relays to inboxes ----------------------------------------------------------------

    async def receive(self, link: RelayLink, sub_id: object, obj: object) -> None:
        """An EVENT from a relay: taken only if intact, asked for, and new."""
        filters = link.filters.get(sub_id) if isinstance(sub_id, str) else None
        if filters is None:
            log.info("%s: dropped an event for subscription %.40r, not ours", link.url, sub_id)
            return
        try:
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            event = from_dict(obj)
        except (ValueError, TypeError) as exc:
            log.info("%s: dropped a malformed event: %s", link.url, exc)
            return
        if event.id in self.seen:
            return  # another relay's copy, or served again: taken already
        if not any(matches(f, event) for f in filters):
            log.info("%s: dropped event %s kind %d: it does not match the subscription",
                     link.url, event.id, event.kind)
            return
        try:
            check(event)
        except ValueError as exc:
            log.info("%s: dropped event %s: %s", link.url, event.id, exc)
            return
        self.seen.add(event.id)
        self.undelivered += 1
        await self._deliveries_in.send((event, link.url))

    async def _deliver(self) -> None:
        async for event, url in self._deliveries_out:
            try:
                await self.deliver(event, url)
            finally:
                self.undelivered -= 1

    async def deliver(self, event: Event, url: str) -> None:
        """One line in the inbox of each local agent the event names; retried until written,
        or refused for good (REFUSALS)."""
        line = inbox_line(event)
        for npub in recipients(event, self.agents):
            backoff = Backoff()
            while True:
                try:
                    await in_thread(self.tree.append_inbox, npub, line)
                except OSError as exc:
                    if exc.errno in REFUSALS:
                        why = REFUSALS[exc.errno]
                        log.info("%s: event %s kind %d not delivered to %s: %s (%s)", url,
                                 event.id, event.kind, npub, why, os.strerror(exc.errno))
                        break
                    delay = backoff.next()
                    log.info("%s: event %s to %s: %s; trying again in %.1fs", url, event.id,
                             npub, exc, delay)
                    await trio.sleep(delay)
                else:
                    log.info("%s: event %s kind %d -> %s/inbox", url, event.id, event.kind,
                             npub)
                    break

    async def save_since(self) -> None:
        """Write nostr/since: the time before which every relay's events are in the inboxes.

        A relay has everything it had before now in the inboxes when its subscription is
        past EOSE and nothing taken is still being written; a relay that is down holds the
        time back. Only relays in use count.
        """
        if self.undelivered == 0:
            now = int(time.time())
            for link in self.links.values():
                if link.live and link.ws is not None:
                    link.caught_up = max(link.caught_up, now)
        if not self.links:
            return
        value = min(link.caught_up for link in self.links.values())
        if value > self.since_written:
            await in_thread(self.tree.write_since, value)
            self.since_written = value

    # - the port to relays ---------------------------------------------------------------

    async def _serve_port(self) -> None:
        waiting_logged = False
        while True:
            try:
                fd = await in_thread(os.open, self.tree.port, os.O_RDWR)
            except FileNotFoundError:
                if not waiting_logged:
                    log.info("no port plumb/nostr yet (no rule plumbs to nostr): waiting")
                    waiting_logged = True
                await trio.sleep(self.poll)
                continue
            waiting_logged = False
            log.info("reading plumb/nostr")
            try:
                await self._publish_from(Port(fd))
            except* OSError as group:
                log.info("plumb/nostr: %s; opening it again", _describe(group))
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
            await trio.sleep(self.poll)

    async def _publish_from(self, port: Port) -> None:
        slots = trio.Semaphore(PUBLISHING)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                line = await port.read_message()
                nursery.start_soon(self._publish_message, port, line, slots)

    async def _publish_message(self, port: Port, line: bytes, slots: trio.Semaphore) -> None:
        try:
            try:
                message = json.loads(line)
                message_id = message["id"]
                if not isinstance(message_id, str) or not message_id:
                    raise ValueError("no id")
            except (ValueError, KeyError, TypeError):
                log.info("plumb/nostr: unreadable message, left unacknowledged: %.120r", line)
                return
            try:
                event = from_json(message.get("data", ""))
                check(event)
            except (ValueError, TypeError) as exc:
                log.info("plumb/nostr: message %s is not a signed event (%s): "
                         "acknowledged, not published", message_id, exc)
                await port.ack(message_id)
                return
            await self.publish(event)
            await port.ack(message_id)
        finally:
            slots.release()

    async def publish(self, event: Event) -> None:
        """Publish to every connected relay until one takes it, or all refuse it for good."""
        backoff = Backoff()
        while True:
            links = [link for link in self.links.values() if link.ws is not None]
            if not links:
                await self._link_up.wait()
                continue
            if await self._publish_once(event, links):
                return
            delay = backoff.next()
            log.info("event %s: no relay took it; trying again in %.1fs", event.id, delay)
            await trio.sleep(delay)

    async def _publish_once(self, event: Event, links: Sequence[RelayLink]) -> bool:
        """True when the event is settled: taken by a relay, or refused by every one."""
        assert self._nursery is not None
        send, answers = trio.open_memory_channel[tuple[str, Outcome, str]](len(links))
        async with send:
            for link in links:
                # In the driver's nursery: the other relays' answers may come after the ack.
                self._nursery.start_soon(_publish_via, link, event, send.clone())
        refused: list[str] = []
        again = False
        async with answers:
            async for url, outcome, reason in answers:
                if outcome.delivered:
                    log.info("%s: published event %s kind %d (%s)", url, event.id, event.kind,
                             outcome.value)
                    return True
                if outcome is Outcome.REFUSED:
                    refused.append(f"{url}: {reason}")
                else:
                    again = True
                    log.info("%s: event %s: %s %s", url, event.id, outcome.value, reason)
        if refused and not again:
            log.info("event %s refused by every relay, dropped: %s", event.id,
                     "; ".join(refused))
            return True
        return False


async def _publish_via(link: RelayLink, event: Event,
                       send: trio.MemorySendChannel[tuple[str, Outcome, str]]) -> None:
    async with send:
        outcome, reason = await link.publish(event)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait((link.url, outcome, reason))


# -- the command -----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentfs-nostr",
        description="Carry Nostr events between relays and the agents of an agentfs mount.")
    p.add_argument("--poll", type=float, default=2.0, metavar="SECONDS",
                   help="how often to read the agents, nostr/relays and save nostr/since "
                        "(default 2)")
    p.add_argument("--relay", action="append", default=[], metavar="URL",
                   help="a relay to use besides those in nostr/relays (repeatable)")
    p.add_argument("mountpoint", type=Path, help="where the agentfs tree is mounted")
    return p


async def _run(driver: Driver) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    # Each connection closes its websocket as it is cancelled (at most 1 s).
                    log.info("%s: closing", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signals)
        await driver.run()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s agentfs-nostr[%(process)d] %(message)s")
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    if args.poll <= 0:
        log.error("--poll must be positive")
        return 2
    _, bad = parse_relays("\n".join(args.relay))
    if bad:
        log.error("--relay wants a ws:// or wss:// URL: %s", ", ".join(bad))
        return 2
    driver = Driver(Tree(args.mountpoint.absolute()), args.relay, args.poll)
    failure: list[str] = []
    try:
        trio.run(_run, driver)
    except* MountGone as group:
        failure.append(_describe(group))
    if failure:
        log.error("%s", failure[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
