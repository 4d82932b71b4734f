"""Two agentfs runtimes federated through a real relay, and an independent Nostr client
(rust-nostr's nostr-sdk) talking to an agent: DMs out and back, decrypted at each end."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nostr_sdk as sdk
import pytest
from conftest import Mount, MountFactory, script, wait_until
from nostr_driving import NostrDriver, nostr_drivers  # noqa: F401  (the fixture `drivers`)
from relay import Relay, query

from agentfs.identity import npub_decode, public_key
from agentfs.nostr import nip17

ROOT = Path(__file__).resolve().parent.parent
RULES = "dst matches 'npub1[02-9ac-hj-np-z]+'\nplumb to nostr\n"
# Notes every trigger that is not a lifecycle one; answers a DM with "re: DATA", and a
# `wake` whose data is an npub with a DM "ping" to it.
PEER = """read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
echo "$t" >> "$0.seen"
type=$(printf '%s' "$t" | jq -r .type)
data=$(printf '%s' "$t" | jq -r .data)
case $type in
dm) printf 're: %s\\n' "$data" ;;
wake) jq -cn --arg to "$data" '{to: $to, data: "ping"}' ;;
esac
"""


@pytest.fixture
def federated(make_mount: MountFactory, relay: Relay, drivers: Callable[..., NostrDriver],
              tmp_path: Path) -> Callable[[str], Mount]:
    """federated(label): a mount using the relay, with its Nostr driver running."""

    def make(label: str) -> Mount:
        mount = make_mount(label)
        (mount.mp / "plumb" / "rules").write_text(RULES)
        (mount.mp / "nostr" / "relays").write_text(relay.url + "\n")
        drivers(mount, tmp_path / f"{label}-driver.log")
        return mount

    return make


def peer(mount: Mount, name: str, tmp_path: Path) -> tuple[str, Path]:
    program = script(tmp_path, f"{name}.sh", PEER)
    npub = mount.new_agent(name, program)
    mount.wait_ticks(name, 1)
    return npub, Path(program + ".seen")


def seen(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_agent_dms_an_agent_of_another_runtime_and_gets_the_reply(
        federated: Callable[[str], Mount], relay: Relay, tmp_path: Path) -> None:
    a, b = federated("a"), federated("b")
    alice, alice_seen = peer(a, "alice", tmp_path)
    bob, bob_seen = peer(b, "bob", tmp_path)
    (a.agent("alice") / "ctl").write_text(f"wake {bob}\n")  # alice DMs bob "ping"

    got = wait_until(lambda: [t for t in seen(alice_seen) if t["type"] == "dm"], 30,
                     "bob's reply in alice's inbox")
    assert [(t["from"], t["data"], t["dm"]) for t in got] == [(bob, "re: ping", "nip17")]
    [asked] = [t for t in seen(bob_seen) if t["type"] == "dm"]
    assert (asked["from"], asked["data"]) == (alice, "ping")
    # One gift wrap each way on the relay: nothing published twice.
    for npub in (alice, bob):
        wraps = query(relay.url, {"kinds": [1059], "#p": [npub_decode(npub).hex()]})
        assert len(wraps) == 1
    assert not [r for m, n in ((a, "alice"), (b, "bob")) for r in m.log(n)
                if r["event"] in ("undelivered", "refused")]


def sdk_keys(secret: bytes) -> sdk.Keys:
    return sdk.Keys(sdk.SecretKey.from_bytes(secret))


def test_nostr_sdk_client_dms_an_agent_and_reads_the_replies(
        federated: Callable[[str], Mount], relay: Relay, tmp_path: Path) -> None:
    b = federated("b")
    bob, bob_seen = peer(b, "bob", tmp_path)
    bob_pub = sdk.PublicKey.from_bytes(npub_decode(bob))
    human = os.urandom(32)
    keys = sdk_keys(human)

    async def converse() -> list[sdk.Event]:
        client = sdk.Client()
        try:
            await client.add_relay(sdk.RelayUrl.parse(relay.url))
            await client.connect()
            rumor = sdk.EventBuilder(sdk.Kind(14), "hello via NIP-17").tags(
                [sdk.Tag.public_key(bob_pub)]).finalize_unsigned(keys.public_key())
            wrap = sdk.nip59_make_gift_wrap(keys, bob_pub, rumor)
            old = sdk.EventBuilder(sdk.Kind(4), sdk.nip04_encrypt(
                keys.secret_key(), bob_pub, "hello via NIP-04")).tags(
                [sdk.Tag.public_key(bob_pub)]).finalize(keys)
            for event in (wrap, old):
                sent = await client.send_event(event)
                assert sent.failed == {} and sent.success, sent
            mine = sdk.Filter().kinds([sdk.Kind(4), sdk.Kind(1059)]).pubkey(keys.public_key())
            for _ in range(100):
                found: list[sdk.Event] = await client.fetch_events(
                    sdk.ReqTarget.auto([mine]), datetime.timedelta(seconds=2))
                if len(found) >= 2:
                    return found
                await asyncio.sleep(0.2)
            return found
        finally:
            await client.shutdown()

    replies = asyncio.run(converse())
    got = {t["dm"]: t for t in seen(bob_seen) if t["type"] == "dm"}
    assert {k: (v["from"], v["data"]) for k, v in got.items()} == {
        "nip17": (keys.public_key().to_bech32(), "hello via NIP-17"),
        "nip04": (keys.public_key().to_bech32(), "hello via NIP-04")}
    texts = {}
    for event in replies:
        assert event.verify()  # our signatures, checked by nostr-sdk
        if event.kind().as_u16() == 1059:
            opened = sdk.UnwrappedGift.from_gift_wrap(keys, event)
            assert opened.sender().to_hex() == npub_decode(bob).hex()
            texts["nip17"] = opened.rumor().content()
        else:
            assert event.author().to_hex() == npub_decode(bob).hex()
            texts["nip04"] = sdk.nip04_decrypt(keys.secret_key(), bob_pub, event.content())
    assert texts == {"nip17": "re: hello via NIP-17", "nip04": "re: hello via NIP-04"}
    assert public_key(human).hex() == keys.public_key().to_hex()
    assert nip17.GIFT_WRAP_KIND == 1059
