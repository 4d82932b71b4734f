"""agentfs-nostr(8), the Nostr driver: its pure parts, then the driver process on real mounts
with a real relay (tests/relay.py) and a misbehaving one (FakeRelay, here).

The human at the other end is played by our agentfs.nostr functions; the daemon verifies
and decrypts what the driver writes into inboxes (test_nostr_daemon.py tests that part).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from conftest import Mount, script, wait_until
from nostr_driving import NostrDriver, nostr_drivers  # noqa: F401  (the fixture `drivers`)
from relay import WAIT, Relay, RelayConnection, publish, query, talk
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from agentfs.identity import npub_decode, npub_encode, public_key
from agentfs.nostr import nip04, nip17
from agentfs.nostr.event import Event, sign
from drivers.nostr import (
    GIFT_WRAP_LOOKBACK,
    MARGIN,
    Backoff,
    Outcome,
    PendingOks,
    SeenIds,
    inbox_line,
    matches,
    outcome_of,
    parse_relays,
    recipients,
    subscription_filters,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = "dst matches 'npub1[02-9ac-hj-np-z]+'\nplumb to nostr\n"
# Notes every trigger that is not a lifecycle one; answers a DM with "re: DATA".
PEER = """read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
echo "$t" >> "$0.seen"
[ "$(printf '%s' "$t" | jq -r .type)" = dm ] || exit 0
printf 're: %s\\n' "$(printf '%s' "$t" | jq -r .data)"
"""


# -- pure parts ------------------------------------------------------------------------------

A, B, C = (bytes.fromhex("00" * 31 + f"{n:02x}") for n in (0xA, 0xB, 0xC))
A_HEX, B_HEX, C_HEX = (public_key(k).hex() for k in (A, B, C))


def test_parse_relays_keeps_ws_urls_once_in_order() -> None:
    text = "ws://a:7447\n\n# a comment\nwss://b.example/path\nhttp://c\nws://a:7447\nws://d:x\n"
    assert parse_relays(text) == (["ws://a:7447", "wss://b.example/path"],
                                  ["http://c", "ws://d:x"])


def test_filters_give_gift_wraps_two_more_days() -> None:
    notes, wraps = subscription_filters([C_HEX, B_HEX, B_HEX], 1_000_000)
    assert notes == {"kinds": [1, 4], "#p": sorted([B_HEX, C_HEX]), "since": 1_000_000 - MARGIN}
    assert wraps == {"kinds": [1059], "#p": sorted([B_HEX, C_HEX]),
                     "since": 1_000_000 - GIFT_WRAP_LOOKBACK - MARGIN}


def test_matches_checks_kind_p_tag_and_time() -> None:
    flt = {"kinds": [1, 4], "#p": [B_HEX], "since": 100, "until": 200}
    assert matches(flt, sign(A, 1, "x", [["e", "y"], ["p", B_HEX]], created_at=100))
    assert not matches(flt, sign(A, 7, "x", [["p", B_HEX]], created_at=150))
    assert not matches(flt, sign(A, 1, "x", [["p", C_HEX]], created_at=150))
    assert not matches(flt, sign(A, 1, "x", [["p"]], created_at=150))
    assert not matches(flt, sign(A, 1, "x", [["p", B_HEX]], created_at=99))
    assert not matches(flt, sign(A, 1, "x", [["p", B_HEX]], created_at=201))
    assert matches({"authors": [A_HEX]}, sign(A, 1, "x"))
    assert not matches({"ids": ["0" * 64]}, sign(A, 1, "x"))


def test_recipients_are_local_agents_named_once() -> None:
    local = {B_HEX: "npub-b", C_HEX: "npub-c"}
    ev = sign(A, 1, "x", [["p", C_HEX], ["p", A_HEX], ["p", C_HEX], ["p", B_HEX]])
    assert recipients(ev, local) == ["npub-c", "npub-b"]
    assert recipients(sign(A, 1, "x", [["e", B_HEX]]), local) == []


def test_inbox_line_is_one_json_line_naming_the_event() -> None:
    ev = sign(A, 1, "caf\u00e9\nnext", [["p", B_HEX]])
    line = inbox_line(ev)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"type": "nostr", "id": f"nostr:{ev.id}", "event": ev.to_dict()}


def test_seen_ids_forget_the_oldest() -> None:
    seen = SeenIds(3)
    for i in "abcd":
        seen.add(i)
    assert "a" not in seen and all(i in seen for i in "bcd")
    seen.add("b")  # used again: now the newest
    seen.add("e")
    assert "c" not in seen and "b" in seen and len(seen) == 3
    seen.discard("b")
    assert "b" not in seen


def test_ok_reasons() -> None:
    assert outcome_of(True, "") is Outcome.ACCEPTED
    assert outcome_of(False, "duplicate: exists") is Outcome.DUPLICATE  # nostr-relay says false
    assert outcome_of(True, "duplicate: have it") is Outcome.DUPLICATE
    assert outcome_of(False, "invalid: bad signature") is Outcome.REFUSED
    assert outcome_of(False, "blocked: no") is Outcome.REFUSED
    assert outcome_of(False, "rate-limited: slow down") is Outcome.RETRY
    assert outcome_of(False, "error: could not save") is Outcome.RETRY
    assert outcome_of("yes", None) is Outcome.REFUSED
    assert Outcome.DUPLICATE.delivered and not Outcome.RETRY.delivered


def test_an_ok_with_an_empty_id_answers_the_oldest_event_awaiting_one() -> None:
    oks = PendingOks()
    first, second, third = oks.add("1" * 64), oks.add("2" * 64), oks.add("3" * 64)
    assert oks.answer("2" * 64, Outcome.ACCEPTED, "") is second
    assert oks.answer("", Outcome.REFUSED, "invalid: x") is first
    assert (first.outcome, first.reason, second.outcome) == \
        (Outcome.REFUSED, "invalid: x", Outcome.ACCEPTED)
    assert oks.answer("f" * 64, Outcome.ACCEPTED, "") is third  # unknown id: the oldest too
    assert oks.answer("", Outcome.ACCEPTED, "") is None
    fourth = oks.add("4" * 64)
    oks.fail_all("connection lost")
    assert fourth.done.is_set() and fourth.outcome is Outcome.NO_ANSWER and len(oks) == 0


def test_backoff_doubles_up_to_its_cap_and_starts_over() -> None:
    backoff = Backoff(1, 8)
    delays = [backoff.next() for _ in range(6)]
    for delay, top in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert top / 2 <= delay <= top
    backoff.reset()
    assert backoff.next() <= 1


# -- the driver process ----------------------------------------------------------------------


class Human:
    """Someone on Nostr with a key of their own."""

    def __init__(self) -> None:
        self.secret = os.urandom(32)
        self.public = public_key(self.secret)
        self.npub = npub_encode(self.public)


def peer(mount: Mount, name: str, tmp_path: Path) -> tuple[bytes, Path]:
    """A new agent running PEER: (its public key, the file where it notes its triggers)."""
    program = script(tmp_path, f"{name}.sh", PEER)
    npub = mount.new_agent(name, program)
    mount.wait_ticks(name, 1)
    return npub_decode(npub), Path(program + ".seen")


def seen(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_seen(path: Path, count: int, timeout: float = 15) -> list[dict[str, Any]]:
    return wait_until(lambda: len(s := seen(path)) >= count and s, timeout,
                      f"{count} triggers in {path.name}")


def port_is_empty(mount: Mount) -> bool:
    """Whether plumb/nostr has nothing queued (an empty read: takes the port's 1 s)."""
    fd = os.open(mount.mp / "plumb" / "nostr", os.O_RDWR)
    try:
        return os.read(fd, 1 << 20) == b""
    finally:
        os.close(fd)


def dm04(human: Human, to: bytes, text: str, created_at: int | None = None) -> Event:
    return sign(human.secret, 4, nip04.encrypt(text, human.secret, to), [["p", to.hex()]],
                created_at)


def test_events_from_a_relay_reach_inboxes_and_replies_go_out(
        mount: Mount, relay: Relay, drivers: Callable[..., NostrDriver],
        tmp_path: Path) -> None:
    (mount.mp / "plumb" / "rules").write_text(RULES)
    (mount.mp / "nostr" / "relays").write_text(relay.url + "\n")
    bob, bob_seen = peer(mount, "bob", tmp_path)
    dave = npub_decode(mount.new_agent("dave"))
    (mount.agent("dave") / "ctl").write_text("terminate\n")
    driver = drivers(mount, tmp_path / "driver.log")
    driver.wait_log(r"subscription agentfs-\d+ caught up")
    human, stranger = Human(), Human()

    wrap = nip17.wrap(human.secret, bob, "hello, bob \u2713")
    old = dm04(human, bob, "old school")
    mention = sign(human.secret, 1, "hey bob", [["p", bob.hex()]])
    elsewhere = dm04(human, stranger.public, "not for this tree")
    # nostr-relay checks the signature against the id it computes, and serves the id it was
    # given: an event with a wrong id gets through it. The driver must drop it.
    forged = sign(human.secret, 4, nip04.encrypt("forged", human.secret, bob),
                  [["p", bob.hex()]])
    forged = Event("0" * 64, forged.pubkey, forged.created_at, 4, forged.tags,
                   forged.content, forged.sig)
    # Intact and asked for, but refused by the daemon: one it cannot open, one to a
    # terminated agent. The driver logs them and goes on.
    garbled = sign(human.secret, 4, "AAAA?iv=AAAAAAAAAAAAAAAAAAAAAA==", [["p", bob.hex()]])
    to_dave = dm04(human, dave, "too late")
    publish(relay.url, garbled, to_dave, wrap, old, mention, elsewhere)
    accepted: list[Any] = []

    async def forge(conn: RelayConnection) -> None:
        accepted.append(await conn.publish(forged))

    talk(relay.url, forge)
    assert accepted[0][2] is True, accepted

    got = wait_seen(bob_seen, 3)
    driver.wait_log(f"dropped event {forged.id}: event id does not match")
    driver.wait_log(f"event {garbled.id} kind 4 not delivered to npub1.*: the daemon refused")
    driver.wait_log(f"event {to_dave.id} kind 4 not delivered to npub1.*: the agent is term")
    assert sorted((t["type"], t.get("dm", ""), t["from"], t["data"]) for t in got) == [
        ("dm", "nip04", human.npub, "old school"),
        ("dm", "nip17", human.npub, "hello, bob \u2713"),
        ("mention", "", human.npub, "hey bob")]
    assert {t["id"] for t in got} == {f"nostr:{e.id}" for e in (wrap, old, mention)}

    # bob's replies: signed by the daemon, published by the driver, acknowledged.
    def replies() -> list[Event]:
        return query(relay.url, {"kinds": [4, 1059], "#p": [human.public.hex()]})

    out = wait_until(lambda: len(r := replies()) == 2 and r, 15, "bob's two replies")
    texts = set()
    for event in out:
        if event.kind == 4:
            assert event.pubkey == bob.hex()
            texts.add(nip04.decrypt(event.content, human.secret, bob))
        else:
            rumor, sender = nip17.unwrap(human.secret, event)
            assert sender == bob
            texts.add(rumor.content)
    assert texts == {"re: hello, bob \u2713", "re: old school"}
    driver.wait_log(f"published event {out[0].id}")
    driver.wait_log(f"published event {out[1].id}")
    assert port_is_empty(mount)
    assert len(seen(bob_seen)) == 3  # nothing taken twice
    assert driver.stop() == 0
    log = driver.text()
    assert "event id does not match" in log and elsewhere.id not in log
    since = int((mount.mp / "nostr" / "since").read_text())
    assert time.time() - 30 < since <= time.time()


def test_an_agent_made_after_start_and_restarts_lose_and_double_nothing(
        mount: Mount, relay: Relay, drivers: Callable[..., NostrDriver],
        tmp_path: Path) -> None:
    (mount.mp / "nostr" / "relays").write_text(relay.url + "\n")
    bob, bob_seen = peer(mount, "bob", tmp_path)
    human = Human()
    driver = drivers(mount, tmp_path / "driver.log")
    driver.wait_log(r"caught up")
    carol, carol_seen = peer(mount, "carol", tmp_path)  # after the driver started
    driver.wait_log(r"subscribed agentfs-\d+ for 2 agent")
    publish(relay.url, dm04(human, carol, "welcome, carol"))
    assert wait_seen(carol_seen, 1)[0]["data"] == "welcome, carol"

    publish(relay.url, dm04(human, bob, "one"))
    wait_seen(bob_seen, 1)
    wait_until(lambda: (mount.mp / "nostr" / "since").read_text() != "", 10, "since saved")
    driver.kill()  # kill -9: nothing closed cleanly
    # While no driver runs: a DM stamped now, and a gift wrap stamped up to 2 days back.
    publish(relay.url, dm04(human, bob, "two"), nip17.wrap(human.secret, bob, "three"))
    driver = drivers(mount, tmp_path / "driver2.log")
    wait_seen(bob_seen, 3)

    relay.restart()
    publish(relay.url, dm04(human, bob, "four"))  # perhaps before the driver is back
    driver.wait_log(r"connected(.|\n)*connected")
    wait_seen(bob_seen, 4)
    publish(relay.url, nip17.wrap(human.secret, bob, "five"))
    wait_seen(bob_seen, 5)
    assert driver.stop() == 0
    # Started again: everything since the saved time comes again, and the daemon drops it.
    driver = drivers(mount, tmp_path / "driver3.log")
    driver.wait_log(r"caught up")
    publish(relay.url, dm04(human, bob, "six"))
    wait_seen(bob_seen, 6)
    time.sleep(0.5)  # time for a copy, if one were coming
    assert sorted(t["data"] for t in seen(bob_seen)) == \
        ["five", "four", "one", "six", "three", "two"]
    assert [t["data"] for t in seen(carol_seen)] == ["welcome, carol"]
    assert mount.status("bob")["pending"] == "0"
    mount.stop()  # the mount goes: the driver says so and exits 1
    assert driver.proc is not None and driver.proc.wait(10) == 1
    driver.wait_log("is not mounted|the mount is gone")


# -- a relay that misbehaves -----------------------------------------------------------------


class FakeRelay(threading.Thread):
    """A websocket server that answers every REQ with `events(sub)` (["EVENT", sub, e] or any
    message) then EOSE, and refuses every EVENT, with an empty id, as nostr-relay does."""

    def __init__(self, events: Callable[[str], list[Any]]) -> None:
        super().__init__(daemon=True)
        self.events = events
        self.published: list[dict[str, Any]] = []
        self.port = 0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def run(self) -> None:
        trio.run(self._main)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve_websocket, self._serve, "127.0.0.1", 0,
                                             None)
                self.port = server.port
                self._ready.set()

    async def _serve(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message[0] == "REQ":
                    for reply in self.events(message[1]):
                        await ws.send_message(json.dumps(reply))
                    await ws.send_message(json.dumps(["EOSE", message[1]]))
                elif message[0] == "EVENT":
                    self.published.append(message[1])
                    await ws.send_message(json.dumps(["OK", "", False, "blocked: not here"]))
        except ConnectionClosed:
            pass

    def __enter__(self) -> FakeRelay:
        self.start()
        assert self._ready.wait(WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self.join(WAIT)


def test_what_a_relay_sends_unasked_or_broken_is_dropped(
        mount: Mount, drivers: Callable[..., NostrDriver], tmp_path: Path) -> None:
    (mount.mp / "plumb" / "rules").write_text(RULES)
    bob, bob_seen = peer(mount, "bob", tmp_path)
    human, stranger = Human(), Human()
    now = int(time.time())
    good = dm04(human, bob, "the only good one")
    to_stranger = dm04(human, stranger.public, "not for bob")
    kind7 = sign(human.secret, 7, "+", [["p", bob.hex()]])
    too_old = dm04(human, bob, "from last week", created_at=now - 7 * 86400)
    bad_sig = dm04(human, bob, "tampered").to_dict()
    bad_sig["content"] = nip04.encrypt("swapped", human.secret, bob)
    bad_sig["id"] = Event.compute_id(bad_sig["pubkey"], bad_sig["created_at"], 4,
                                     bad_sig["tags"], bad_sig["content"])
    other_sub = dm04(human, bob, "for a subscription the driver never made")

    def events(sub: str) -> list[Any]:
        return [["EVENT", sub, to_stranger.to_dict()], ["EVENT", sub, kind7.to_dict()],
                ["EVENT", sub, too_old.to_dict()], ["EVENT", sub, bad_sig],
                ["EVENT", sub, {"id": "nope"}], ["EVENT", "theirs", other_sub.to_dict()],
                ["OK", "", True, ""], "not a list", ["EVENT", sub, good.to_dict()],
                ["EVENT", sub, good.to_dict()]]

    with FakeRelay(events) as fake:
        driver = drivers(mount, tmp_path / "driver.log", "--relay", fake.url)
        [got] = wait_seen(bob_seen, 1)
        assert (got["data"], got["from"]) == ("the only good one", human.npub)
        driver.wait_log(f"dropped event {to_stranger.id} kind 4: it does not match")
        driver.wait_log(f"dropped event {kind7.id} kind 7: it does not match")
        driver.wait_log(f"dropped event {too_old.id} kind 4: it does not match")
        driver.wait_log(f"dropped event {bad_sig['id']}: event signature is not valid")
        driver.wait_log("dropped a malformed event")
        driver.wait_log("dropped an event for subscription 'theirs'")
        driver.wait_log("OK for no event awaiting one")

        # bob's reply: the relay refuses it (OK with an empty id): the driver gives up on it.
        reply = wait_until(lambda: fake.published, 15, "bob's reply at the fake relay")[0]
        driver.wait_log(f"event {reply['id']} refused by every relay, dropped: "
                        f".*blocked: not here")
        assert port_is_empty(mount)
        assert driver.stop() == 0
    assert len(seen(bob_seen)) == 1
    assert mount.status("bob")["pending"] == "0"
