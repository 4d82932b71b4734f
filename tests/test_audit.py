"""The audit trail: every log record chained to the one before, each commit's head signed by
the agent's key, and `agentfs verify` catching a record edited, deleted or moved inside the
store (the daemon stopped, the LMDB changed by hand)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import lmdb
import nostr_sdk as sdk
import pytest
from conftest import AGENTFS, READ_TRIGGER, Mount, Store, script, sh, wait_until
from nostr_driving import NostrDriver, nostr_drivers  # noqa: F401  (the fixture `drivers`)
from relay import Relay, query

from agentfs.identity import npub_decode
from agentfs.nostr.event import Event, to_json
from agentfs.store import agent_key

PROGRAM = READ_TRIGGER + 'echo "$trigger" | jq -r .data > "$AGENT_DIR/state/last"\n'


def verify(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENTFS, "verify", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=60)


def busy_agent(mount: Mount, tmp_path: Path, name: str, messages: int) -> Path:
    """An agent that has run `messages` ticks (and its `create`), with a ctl and a budget
    record among them."""
    mount.new_agent(name, script(tmp_path, f"{name}.sh", PROGRAM))
    mount.created(name)
    agent = mount.agent(name)
    sh(f"echo 'max_tick_duration 20s' > {agent}/budget && echo 'idle 1h' > {agent}/ctl")
    for n in range(messages):
        sh(f"echo 'message {n}' > {agent}/inbox")
        mount.wait_ticks(name, n + 2)
    return agent


def raw_log(store: Path, index: int) -> list[tuple[bytes, bytes]]:
    """The agent's log as the store holds it: (key, line) in order."""
    env = lmdb.open(str(store), max_dbs=32, readonly=True)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)
                    if bytes(k).startswith(agent_key(index))]
    finally:
        env.close()


def rewrite_log(store: Path, put: dict[bytes, bytes], delete: tuple[bytes, ...] = ()) -> None:
    env = lmdb.open(str(store), max_dbs=32)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin(write=True) as txn:
            for key, value in put.items():
                txn.put(key, value, db=db)
            for key in delete:
                assert txn.delete(key, db=db)
    finally:
        env.close()


def test_records_chain_and_the_head_is_signed(mount: Mount, tmp_path: Path) -> None:
    npub = mount.new_agent("chained", script(tmp_path, "p.sh", PROGRAM))
    mount.created("chained")
    agent = mount.agent("chained")
    for n in range(3):
        sh(f"echo 'message {n}' > {agent}/inbox")
        mount.wait_ticks("chained", n + 2)
    sh(f"echo 'idle 1h' > {agent}/ctl")
    pubkey = npub_decode(npub).hex()
    records = mount.log("chained")
    assert [r["event"] for r in records] == ["create", "tick", "tick", "tick", "tick", "ctl"]
    # What agentfs(4) says a third party checks, with shell tools: the first record's prev
    # is the agent's key, each other's the SHA-256 of the line before, newline and all.
    assert records[0]["prev"] == pubkey
    for n in range(1, len(records)):
        digest = sh(f"sed -n {n}p {agent}/log | sha256sum").stdout.split()[0]
        assert records[n]["prev"] == digest
    # jq over the log, and reading from an offset, work as before.
    assert sh(f"jq -r .event {agent}/log | tail -1").stdout == "ctl\n"
    offset = len(b"".join((agent / "log").read_bytes().splitlines(keepends=True)[:2]))
    assert sh(f"tail -c +{offset + 1} {agent}/log | head -1 | jq -r .event").stdout == "tick\n"

    head = json.loads((agent / "head").read_text())
    assert head["kind"] == 30078 and head["pubkey"] == pubkey
    tags = {t[0]: t[1] for t in head["tags"]}
    assert tags["d"] == "agentfs/log"
    assert int(tags["size"]) == (agent / "log").stat().st_size
    assert tags["head"] == sh(f"tail -1 {agent}/log | sha256sum").stdout.split()[0]
    event = sdk.Event.from_json((agent / "head").read_text())  # an independent implementation
    assert event.verify() and event.author().to_bech32() == npub

    done = verify(mount.store.path, "chained")  # beside the daemon serving the store
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 records check" in done.stdout and "covers records 1-6" in done.stdout
    assert verify(mount.store.path, npub).returncode == 0
    # A copy of the log and its head, checked anywhere (the head read first: the log may
    # grow after it, and what comes after is chained to it).
    sh(f"cat {agent}/head > {tmp_path}/head.json && cat {agent}/log > {tmp_path}/log.jsonl")
    sh(f"echo 'message late' > {agent}/inbox")
    mount.wait_ticks("chained", 5)
    sh(f"cat {agent}/log > {tmp_path}/later.jsonl")
    for copy, said in (("log.jsonl", "6 records check"), ("later.jsonl", "records 7-7 came")):
        done = subprocess.run([*AGENTFS, "verify", "--log", str(tmp_path / copy), "--head",
                               str(tmp_path / "head.json"), "--npub", npub],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and said in done.stdout, done.stdout + done.stderr
    # The chain goes on across a restart.
    mount.restart()
    sh(f"echo 'after restart' > {agent}/inbox")
    mount.wait_ticks("chained", 6)
    done = verify(mount.store.path, "chained")
    assert done.returncode == 0 and "8 records check" in done.stdout, done.stdout


def test_an_agent_cannot_write_its_head(mount: Mount, tmp_path: Path) -> None:
    mount.new_agent("honest", script(tmp_path, "p.sh", PROGRAM))
    mount.created("honest")
    agent = mount.agent("honest")
    done = sh(f"echo forged > {agent}/head", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert mount.log("honest")[-1]["op"] == "open head for writing"
    assert verify(mount.store.path, "honest").returncode == 0


@pytest.mark.parametrize("tamper", ["edit", "edit last", "delete", "reorder"])
def test_verify_names_the_first_record_that_does_not_check(
        mount: Mount, tmp_path: Path, tamper: str) -> None:
    busy_agent(mount, tmp_path, "victim", 3)
    done = verify(mount.store.path, "victim")
    assert done.returncode == 0, done.stdout
    mount.stop()
    store = mount.store.path
    lines = raw_log(store, 0)
    assert len(lines) == 7  # create, its tick, budget, ctl, three ticks
    (k2, v2), (k3, v3) = lines[2], lines[3]
    if tamper == "edit":  # the budget record says another limit, the same length
        assert b'"20s"' in v2
        rewrite_log(store, {k2: v2.replace(b'"20s"', b'"90s"')})
        said = "record 4 (byte {}) does not follow the chain: its prev is not the SHA-256 " \
               "of record 3: record 3 was changed".format(len(b"".join(v for _, v in lines[:3])))
    elif tamper == "edit last":
        key, last = lines[-1]
        rewrite_log(store, {key: last.replace(b'"result":"ok"', b'"result":"no"')})
        said = "record 7 (byte {}) does not check: it is the last record the head signs" \
               .format(len(b"".join(v for _, v in lines[:6])))
    elif tamper == "delete":
        rewrite_log(store, {}, delete=(k2,))
        said = "record 3 (byte {}) does not follow the chain".format(
            len(b"".join(v for _, v in lines[:2])))
    else:
        rewrite_log(store, {k2: v3, k3: v2})
        said = "record 3 (byte {}) does not follow the chain".format(
            len(b"".join(v for _, v in lines[:2])))
    done = verify(store, "victim")
    assert done.returncode == 1, done.stdout
    assert said in done.stdout, done.stdout


def test_verify_catches_a_log_cut_short_and_a_forged_head(mount: Mount, tmp_path: Path) -> None:
    agent = busy_agent(mount, tmp_path, "cut", 1)
    head = (agent / "head").read_text()
    mount.stop()
    store = mount.store.path
    lines = raw_log(store, 0)
    rewrite_log(store, {}, delete=(lines[-1][0],))
    done = verify(store, "cut")
    assert done.returncode == 1
    assert "records were removed from its end" in done.stdout, done.stdout

    forged = json.loads(head)
    forged["tags"] = [["size", str(len(b"".join(v for _, v in lines[:-1])))]
                      if t[0] == "size" else t for t in forged["tags"]]
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    (tmp_path / "log.jsonl").write_bytes(b"".join(v for _, v in lines[:-1]))
    done = subprocess.run([*AGENTFS, "verify", "--log", str(tmp_path / "log.jsonl"), "--head",
                           str(tmp_path / "forged.json")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "the signed head does not check: event id does not match" in done.stdout, done.stdout


def test_a_store_from_before_the_chain_is_chained_from_its_next_record(
        mount: Mount, tmp_path: Path) -> None:
    """A version 2 store's records stay as they were (offsets too); the chain starts after."""
    agent = busy_agent(mount, tmp_path, "old", 1)
    mount.stop()
    store = mount.store.path
    env = lmdb.open(str(store), max_dbs=32)
    try:
        log, heads, meta = (env.open_db(n, create=False) for n in (b"log", b"heads", b"meta"))
        with env.begin(write=True) as txn:  # as version 2 wrote them: no prev, no head
            old = [json.loads(v) for k, v in txn.cursor(db=log) if k.startswith(agent_key(0))]
            offset = 0
            for key, _ in list(txn.cursor(db=log)):
                txn.delete(key, db=log)
            for record in old:
                del record["prev"]
                line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
                txn.put(agent_key(0) + offset.to_bytes(8, "big"), line, db=log)
                offset += len(line)
            assert txn.delete(agent_key(0), db=heads)
            txn.put(b"version", b"2", db=meta)
    finally:
        env.close()
    done = verify(store, "old")
    assert done.returncode == 2 and "store version b'2'" in done.stderr
    mount.start()
    before = (agent / "log").read_bytes()
    sh(f"echo 'after the upgrade' > {agent}/inbox")
    mount.wait_ticks("old", 3)
    records = mount.log("old")
    assert (agent / "log").read_bytes().startswith(before)
    assert "prev" not in records[len(old) - 1] and "prev" in records[len(old)]
    done = verify(store, "old")
    assert done.returncode == 0, done.stdout
    assert f"records 1-{len(old)} predate the chain" in done.stdout


def test_verify_without_such_an_agent(store: Store) -> None:
    done = subprocess.run([*AGENTFS, "verify", "--store", str(store.path), "nobody"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no agent 'nobody'" in done.stderr


def test_published_heads_reach_a_relay_and_check_there(
        mount: Mount, relay: Relay, drivers: Callable[..., NostrDriver], tmp_path: Path) -> None:
    """`publish heads`: the heads go out through the nostr port; a relay keeps the latest,
    which checks against the log with nothing but the two (and nostr-sdk agrees)."""
    (mount.mp / "plumb" / "rules").write_text("dst matches 'npub1[02-9ac-hj-np-z]+'\n"
                                               "plumb to nostr\n")
    (mount.mp / "nostr" / "relays").write_text(relay.url + "\n")
    npub = mount.new_agent("open", script(tmp_path, "p.sh", PROGRAM))
    mount.created("open")
    agent = mount.agent("open")
    assert mount.status("open")["publish"] == "none"
    sh(f"echo 'idle 1h' > {agent}/ctl")
    drivers(mount, tmp_path / "driver.log")
    pubkey = npub_decode(npub).hex()
    assert query(relay.url, {"kinds": [30078], "authors": [pubkey]}) == []
    sh(f"echo 'publish heads' > {agent}/ctl")
    assert mount.status("open")["publish"] == "heads"
    for n in range(3):
        sh(f"echo 'message {n}' > {agent}/inbox")
        mount.wait_ticks("open", n + 2)
    size = str((agent / "log").stat().st_size)

    def latest() -> list[Event] | None:
        found = query(relay.url, {"kinds": [30078], "authors": [pubkey], "#d": ["agentfs/log"]})
        sizes = [tag[1] for event in found for tag in event.tags if tag[0] == "size"]
        return found if sizes == [size] else None

    [head] = wait_until(latest, 20, "the latest head on the relay")
    (tmp_path / "head.json").write_text(to_json(head))
    assert sdk.Event.from_json(to_json(head)).verify()
    sh(f"cat {agent}/log > {tmp_path}/log.jsonl")
    done = subprocess.run([*AGENTFS, "verify", "--log", str(tmp_path / "log.jsonl"), "--head",
                           str(tmp_path / "head.json"), "--npub", npub],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    records = len((agent / "log").read_bytes().splitlines())
    assert f"covers records 1-{records}" in done.stdout

    # Off again: what the agent does from now on stays in the store.
    sh(f"echo 'publish none' > {agent}/ctl")
    sh(f"echo 'quiet' > {agent}/inbox")
    mount.wait_ticks("open", 5)
    assert mount.log("open")[-2]["command"] == "publish none"
    assert {e.id for e in query(relay.url, {"kinds": [30078], "authors": [pubkey]})} == {head.id}
