"""Nostr inside the daemon, through the mount: events signed at commit with the agent's key,
incoming events verified and opened into inbox entries, and no key anywhere in the tree.

The human at the other end is played by our own agentfs.nostr functions here; the
independent library (nostr-sdk) checks the same paths in test_nostr_interop.py and the
driver tests.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, errno_of, script, wait_until, write_once

from agentfs.identity import agent_private_key, npub_decode, npub_encode, public_key
from agentfs.nostr import event, nip04, nip17, nip44

RULES = "dst matches 'npub1[02-9ac-hj-np-z]+'\nplumb to nostr\n"
# Answers every message that is not a lifecycle trigger with "re: DATA" on stdout.
ANSWER = """read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
echo "$t" >> "$0.seen"
printf 're: %s\\n' "$(printf '%s' "$t" | jq -r .data)"
"""


class Human:
    """Someone on Nostr with a key of their own."""

    def __init__(self) -> None:
        self.secret = os.urandom(32)
        self.public = public_key(self.secret)
        self.npub = npub_encode(self.public)


def give(mount: Mount, name: str, ev: event.Event) -> int:
    line = json.dumps({"type": "nostr", "event": ev.to_dict()}) + "\n"
    return write_once(mount.agent(name) / "inbox", line, os.O_WRONLY | os.O_APPEND)


def take(mount: Mount, port: str = "nostr") -> dict[str, Any]:
    """One message from a port, acknowledged."""
    fd = os.open(mount.mp / "plumb" / port, os.O_RDWR)
    try:
        raw = b""
        while not raw:
            raw = os.read(fd, 1 << 20)
        message: dict[str, Any] = json.loads(raw)
        os.write(fd, f"ack {message['id']}\n".encode())
        return message
    finally:
        os.close(fd)


@pytest.fixture
def bob(mount: Mount, tmp_path: Path) -> Path:
    (mount.mp / "plumb" / "rules").write_text(RULES)
    program = script(tmp_path, "bob.sh", ANSWER)
    mount.new_agent("bob", program)
    mount.wait_ticks("bob", 1)
    return Path(program + ".seen")


def test_a_gift_wrapped_dm_is_opened_and_the_answer_goes_back_sealed(
        mount: Mount, bob: Path) -> None:
    human = Human()
    bob_pub = npub_decode(os.readlink(mount.agent("bob")))
    wrap = nip17.wrap(human.secret, bob_pub, "hello, bob ✓")
    give(mount, "bob", wrap)
    mount.wait_ticks("bob", 2)
    seen = json.loads(bob.read_text())
    assert (seen["type"], seen["dm"], seen["from"], seen["data"]) == \
        ("dm", "nip17", human.npub, "hello, bob ✓")
    assert seen["id"] == f"nostr:{wrap.id}" and seen["nostr"]["kind"] == 1059
    queued = take(mount)
    out = event.from_json(queued["data"])
    assert event.verify(out) and out.kind == 1059 and queued["id"] == out.id
    assert ["p", human.public.hex()] in [list(t) for t in out.tags]
    rumor, sender = nip17.unwrap(human.secret, out)
    assert (rumor.content, sender) == ("re: hello, bob ✓", bob_pub)


def test_a_nip04_dm_is_answered_as_nip04(mount: Mount, bob: Path) -> None:
    human = Human()
    bob_pub = npub_decode(os.readlink(mount.agent("bob")))
    dm = event.sign(human.secret, 4, nip04.encrypt("old school", human.secret, bob_pub),
                    [["p", bob_pub.hex()]])
    give(mount, "bob", dm)
    mount.wait_ticks("bob", 2)
    assert json.loads(bob.read_text())["dm"] == "nip04"
    out = event.from_json(take(mount)["data"])
    assert event.verify(out) and out.kind == 4 and out.pubkey == bob_pub.hex()
    assert nip04.decrypt(out.content, human.secret, bob_pub) == "re: old school"


def test_a_mention_arrives_as_a_mention_trigger(mount: Mount, bob: Path) -> None:
    human = Human()
    bob_hex = npub_decode(os.readlink(mount.agent("bob"))).hex()
    note = event.sign(human.secret, 1, "hey @bob", [["p", bob_hex]])
    give(mount, "bob", note)
    mount.wait_ticks("bob", 2)
    seen = json.loads(bob.read_text())
    assert (seen["type"], seen["from"], seen["data"]) == ("mention", human.npub, "hey @bob")


def test_the_same_event_twice_is_one_trigger(mount: Mount, bob: Path) -> None:
    human = Human()
    bob_pub = npub_decode(os.readlink(mount.agent("bob")))
    wrap = nip17.wrap(human.secret, bob_pub, "once")
    give(mount, "bob", wrap)
    give(mount, "bob", wrap)  # from a second relay, or after a driver restart
    mount.wait_ticks("bob", 2)
    take(mount)
    assert len(bob.read_text().splitlines()) == 1
    assert mount.status("bob")["pending"] == "0"


@pytest.mark.parametrize("flaw", ["signature", "id", "other agent", "kind", "ciphertext"])
def test_a_bad_event_is_refused_and_logged(mount: Mount, bob: Path, flaw: str) -> None:
    human = Human()
    bob_pub = npub_decode(os.readlink(mount.agent("bob")))
    good = nip04.encrypt("x", human.secret, bob_pub)
    tags = [["p", bob_pub.hex()]]
    if flaw == "other agent":
        tags = [["p", Human().public.hex()]]
    ev = event.sign(human.secret, 7 if flaw == "kind" else 4,
                    "AAAA?iv=AAAAAAAAAAAAAAAAAAAAAA==" if flaw == "ciphertext" else good, tags)
    raw = ev.to_dict()
    if flaw == "signature":
        raw["sig"] = raw["sig"][:-2] + ("00" if raw["sig"][-2:] != "00" else "11")
    if flaw == "id":
        raw["content"] = raw["content"] + " "
    line = json.dumps({"type": "nostr", "event": raw}) + "\n"
    before = mount.status("bob")
    assert errno_of(lambda: write_once(mount.agent("bob") / "inbox", line)) == errno.EINVAL
    refused = [r for r in mount.log("bob") if r["event"] == "refused"]
    assert refused and refused[-1]["error"].startswith("nostr: ")
    assert mount.status("bob") == before


def test_no_private_key_in_the_tree_or_the_log(mount: Mount, bob: Path) -> None:
    human = Human()
    bob_pub = npub_decode(os.readlink(mount.agent("bob")))
    give(mount, "bob", nip17.wrap(human.secret, bob_pub, "secret?"))
    mount.wait_ticks("bob", 2)
    take(mount)
    secret = agent_private_key(mount.store.mnemonic, 0)
    assert public_key(secret) == bob_pub
    needles = [secret.hex().encode(), secret]
    for root, _dirs, files in os.walk(mount.mp):
        for name in files:
            path = Path(root) / name
            if name in ("ctl",) and Path(root) == mount.mp:
                continue  # reading the root ctl returns what this open created: nothing
            if path.parent.name == "plumb" and name not in ("rules",):
                continue  # a port read would wait for a message
            data = path.read_bytes()
            assert not any(n in data for n in needles), path
    log = (mount.store.path / "daemon.log").read_bytes()
    assert not any(n in log for n in needles)


def test_plumb_send_to_nostr_needs_an_event_signed_already(mount: Mount, bob: Path) -> None:
    send = mount.mp / "plumb" / "send"
    target = Human().npub
    unsigned = json.dumps({"src": "me", "dst": target, "type": "text", "data": "hi"}) + "\n"
    assert errno_of(lambda: write_once(send, unsigned)) == errno.EINVAL
    signed = event.sign(Human().secret, 1, "already signed")
    line = json.dumps({"src": "me", "dst": target, "type": "text",
                       "data": event.to_json(signed)}) + "\n"
    write_once(send, line)
    assert take(mount)["id"] == signed.id


def test_relays_and_since_files(mount: Mount) -> None:
    relays = mount.mp / "nostr" / "relays"
    relays.write_text("ws://127.0.0.1:7447\n# a comment\nwss://relay.example\n")
    assert relays.read_text() == "ws://127.0.0.1:7447\nwss://relay.example\n"
    for bad in ("http://nope", "ws://", "ws://host:99999", "ws://host:port", "wss://a b"):
        assert errno_of(lambda b=bad: write_once(relays, b + "\n")) == errno.EINVAL, bad
    assert relays.read_text() == "ws://127.0.0.1:7447\nwss://relay.example\n"
    with open(relays, "w"):
        pass  # `: > relays`: replaced by nothing, when the file is released after close
    wait_until(lambda: relays.read_text() == "", 5, "the relays to be emptied")
    since = mount.mp / "nostr" / "since"
    born = int(since.read_text())  # the store's creation: nothing before it is for its agents
    assert abs(born - time.time()) < 120
    since.write_text("1764000000\n")
    assert since.read_text() == "1764000000\n"
    assert errno_of(lambda: write_once(since, "yesterday\n")) == errno.EINVAL
    mount.restart()
    assert since.read_text() == "1764000000\n"
    wait_until(lambda: relays.read_text() == "", 5, "relays to stay empty over a restart")


def test_a_ciphertext_nested_too_deep_is_einval_not_a_crash(mount: Mount, bob: Path) -> None:
    # A stranger's seal whose rumor is JSON nested deeper than any parser goes.
    human = Human()
    bob_pub = npub_decode(os.readlink(mount.agent("bob")))
    key = nip44.get_conversation_key(human.secret, bob_pub)
    seal = event.sign(human.secret, nip17.SEAL_KIND, nip44.encrypt("[" * 20000, key))
    wrap = nip17.gift_wrap(seal, bob_pub)
    line = json.dumps({"type": "nostr", "event": wrap.to_dict()}) + "\n"
    assert errno_of(lambda: write_once(mount.agent("bob") / "inbox", line)) == errno.EINVAL
    assert mount.log("bob")[-1]["error"].startswith(f"nostr: event {wrap.id}")
    give(mount, "bob", nip17.wrap(human.secret, bob_pub, "still here?"))
    mount.wait_ticks("bob", 2)  # the daemon, and the agent, go on


def test_a_dm_too_long_for_nip44_is_undelivered_and_the_tick_stands(
        mount: Mount, tmp_path: Path) -> None:
    (mount.mp / "plumb" / "rules").write_text(RULES)
    human = Human()
    program = script(tmp_path, "long.sh", f"""read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
printf '{{"to":"{human.npub}","data":"'; head -c 70000 /dev/zero | tr '\\0' x; printf '"}}\\n'
""")
    mount.new_agent("long", program)
    write_once(mount.agent("long") / "inbox", "go\n")
    mount.wait_ticks("long", 2)
    [undelivered] = [r for r in mount.log("long") if r["event"] == "undelivered"]
    assert undelivered["to"] == human.npub
    assert undelivered["error"].startswith("nostr: cannot make the event")


@pytest.mark.parametrize("ident", ["alarm:1795567368613.1", "nostr:" + "ab" * 32])
def test_an_agent_cannot_send_a_drivers_id(mount: Mount, tmp_path: Path, ident: str) -> None:
    # With one it could fire another agent's alarm, or have a DM on its way dropped.
    program = script(tmp_path, "forge.sh", f"""read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
line='{{"to":"victim","type":"alarm","id":"{ident}"}}'
echo "$line" >> "$AGENT_DIR/outbox" || echo refused > "$0.out"
""")
    mount.new_agent("victim")
    mount.new_agent("forger", program)
    write_once(mount.agent("forger") / "inbox", "go\n")
    mount.wait_ticks("forger", 2)
    assert Path(program + ".out").read_text() == "refused\n"
    assert mount.inbox("victim") == []
    assert mount.log("forger")[-2]["errno"] == "EINVAL"


def test_emptying_since_is_refused_and_logged(mount: Mount) -> None:
    since = mount.mp / "nostr" / "since"
    before = since.read_text()
    with open(since, "w"):
        pass
    wait_until(lambda: "refused truncate nostr/since" in
               (mount.store.path / "daemon.log").read_text(), 5, "the refusal in daemon.log")
    assert since.read_text() == before
