"""Our events against a real relay (nostr-relay): accepted, served back by filters, tampered ones
refused, stored across a relay restart. The client is relay.py's: NIP-01 raw over trio-websocket."""

from __future__ import annotations

import time
from typing import Any

import trio
from relay import WAIT, Relay, RelayConnection, publish, query, talk
from trio_websocket import open_websocket_url

from agentfs.nostr import nip17
from agentfs.nostr.event import Event, from_dict, sign, verify
from agentfs.nostr.keys import public_key

ALICE = bytes.fromhex("00" * 31 + "0a")
BOB = bytes.fromhex("00" * 31 + "0b")
CAROL = bytes.fromhex("00" * 31 + "0c")


def ids(events: list[Event]) -> set[str]:
    return {e.id for e in events}


def test_signed_event_is_accepted_and_served(relay: Relay) -> None:
    note = sign(ALICE, 1, "hello relay \u2603 \"quoted\"\n", [["t", "agentfs"]])
    replies: list[list[Any]] = []

    async def scenario(conn: RelayConnection) -> None:
        replies.append(await conn.publish(note))
        # A second copy is not stored twice. NIP-01 wants ["OK", id, true, "duplicate: …"];
        # nostr-relay 1.14 says false, so a publisher must take "duplicate:" as delivered.
        replies.append(await conn.publish(note))
        replies.append([e.to_dict() for e in await conn.query({"authors": [note.pubkey]})])

    talk(relay.url, scenario)
    accepted, duplicate, served = replies
    assert accepted == ["OK", note.id, True, ""]
    assert duplicate[1] == note.id and duplicate[3].startswith("duplicate:"), duplicate
    assert served == [note.to_dict()]
    assert verify(from_dict(served[0]))


def test_tampered_events_are_refused(relay: Relay) -> None:
    note = sign(ALICE, 1, "the original")
    content = Event(note.id, note.pubkey, note.created_at, note.kind, note.tags, "tampered",
                    note.sig)
    assert note.sig is not None
    flipped = format(int(note.sig[-1], 16) ^ 1, "x")
    signature = Event(note.id, note.pubkey, note.created_at, note.kind, note.tags,
                      note.content, note.sig[:-1] + flipped)
    refusals: dict[str, list[Any]] = {}

    async def refuse(name: str, event: Event) -> None:
        async with open_websocket_url(relay.url) as ws:
            refusals[name] = await RelayConnection(ws).publish(event)

    async def main() -> None:
        # nostr-relay delays its answer to a refused event by 2 s (and doubles the delay for
        # the rest of the connection): one connection each, side by side.
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refuse, "content", content)
                nursery.start_soon(refuse, "signature", signature)

    trio.run(main)
    for name, ok in refusals.items():
        # nostr-relay answers a refusal with an empty id where NIP-01 wants the event's.
        assert ok[0] == "OK" and ok[1] in ("", note.id) and ok[2] is False, (name, ok)
        assert ok[3].startswith("invalid:"), (name, ok)
    assert query(relay.url, {"authors": [note.pubkey]}) == []


def test_filters_select_by_time_tags_ids_and_limit(relay: Relay) -> None:
    now = int(time.time())
    bob, carol = public_key(BOB).hex(), public_key(CAROL).hex()
    old = sign(ALICE, 1, "old", [["p", bob], ["t", "x"]], created_at=now - 300)
    mid = sign(ALICE, 1, "mid", [["p", carol]], created_at=now - 200)
    new = sign(ALICE, 7, "new", [["p", bob], ["t", "y"]], created_at=now - 100)
    other = sign(BOB, 1, "someone else", [["p", carol]], created_at=now - 100)
    publish(relay.url, old, mid, new, other)
    alice = {"authors": [old.pubkey]}

    assert ids(query(relay.url, {**alice, "since": now - 200})) == {mid.id, new.id}
    # NIP-01 has since <= created_at <= until; nostr-relay 1.14 makes until exclusive, so no
    # query here stands on that boundary.
    assert ids(query(relay.url, {**alice, "until": now - 150})) == {old.id, mid.id}
    assert ids(query(relay.url, {"#p": [bob]})) == {old.id, new.id}
    assert ids(query(relay.url, {"#p": [carol], "kinds": [1]})) == {mid.id, other.id}
    assert ids(query(relay.url, {"#t": ["y"]})) == {new.id}
    assert ids(query(relay.url, {"ids": [mid.id, other.id]})) == {mid.id, other.id}
    assert ids(query(relay.url, {**alice, "kinds": [7]})) == {new.id}
    # limit keeps the newest (NIP-01), and the relay sends them newest first.
    assert [e.id for e in query(relay.url, {**alice, "limit": 2})] == [new.id, mid.id]
    # Two filters in one REQ: the union.
    assert ids(query(relay.url, {"#t": ["x"]}, {"authors": [other.pubkey]})) == {old.id,
                                                                                  other.id}


def test_open_subscription_gets_new_events(relay: Relay) -> None:
    bob = public_key(BOB).hex()
    later = sign(ALICE, 1, "after EOSE", [["p", bob]])
    unrelated = sign(ALICE, 1, "not for bob")
    received: list[list[Any]] = []

    async def main() -> None:
        with trio.fail_after(WAIT):
            async with open_websocket_url(relay.url) as ws:
                conn = RelayConnection(ws)
                assert await conn.subscribe("live", {"#p": [bob]}) == []
                async with open_websocket_url(relay.url) as other:
                    await RelayConnection(other).publish(unrelated)
                    await RelayConnection(other).publish(later)
                received.append(await conn.receive())

    trio.run(main)
    assert received == [["EVENT", "live", later.to_dict()]]


def test_gift_wrap_travels_through_the_relay(relay: Relay) -> None:
    bob = public_key(BOB)
    wrapped = nip17.wrap(ALICE, bob, "for bob's eyes")
    publish(relay.url, wrapped)
    [fetched] = query(relay.url, {"kinds": [nip17.GIFT_WRAP_KIND], "#p": [bob.hex()]})
    assert fetched == wrapped
    rumor, sender = nip17.unwrap(BOB, fetched)
    assert (rumor.content, sender) == ("for bob's eyes", public_key(ALICE))


def test_restart_keeps_stored_events(relay: Relay) -> None:
    note = sign(ALICE, 1, "survives a restart")
    publish(relay.url, note)
    url, pid = relay.url, relay.pid
    relay.restart()
    assert relay.url == url and relay.pid != pid
    assert query(relay.url, {"ids": [note.id]}) == [note]
    later = sign(ALICE, 1, "after the restart")
    publish(relay.url, later)
    assert ids(query(relay.url, {"authors": [note.pubkey]})) == {note.id, later.id}
