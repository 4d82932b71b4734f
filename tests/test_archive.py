"""agentfs export and import: an agent moved between real stores, mounted before and after.

A store made from the same mnemonic takes the agent at its own index, with its own npub; a
store of another mnemonic takes it only with its key (`export --with-key`, NIP-49), and the
agent then answers a DM at its old npub through a real relay.  A damaged archive is refused
whole: the store's every database is the same after as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import select
import subprocess
import tarfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AGENTFS,
    READ_TRIGGER,
    UID_BASE,
    Mount,
    MountFactory,
    Store,
    init_store,
    json_lines,
    script,
    wait_until,
)
from nostr_driving import NostrDriver, nostr_drivers  # noqa: F401  (the fixture `drivers`)
from relay import Relay, publish, query

from agentfs.identity import agent_private_key, npub_decode, npub_encode, public_key
from agentfs.nostr import nip17, nip49
from agentfs.store import DB_NAMES, AgentStore

PASSPHRASE = "tr\u00e8s secret, even so"
REPLY = READ_TRIGGER + 'printf "got %s\\n" "$(printf %s "$trigger" | jq -r .data)"\n'


def agentfs(*args: str, stdin: bytes = b"", passphrase: str | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """`agentfs ARGS`, with `passphrase` (if given) on a pipe named by --passphrase-fd."""
    fds: tuple[int, ...] = ()
    argv = list(args)
    if passphrase is not None:
        read, write = os.pipe()
        os.write(write, passphrase.encode() + b"\n")
        os.close(write)
        fds = (read,)
        argv[1:1] = ["--passphrase-fd", str(read)]
    try:
        return subprocess.run([*AGENTFS, *argv], input=stdin, capture_output=True,
                              timeout=120, pass_fds=fds, **kwargs)
    finally:
        for fd in fds:
            os.close(fd)


def export(*args: str, passphrase: str | None = None) -> bytes:
    done = agentfs("export", *args, passphrase=passphrase)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def import_(store: Store, tar: bytes, *args: str,
            passphrase: str | None = None) -> subprocess.CompletedProcess[bytes]:
    return agentfs("import", "--store", str(store.path), *args, "-", stdin=tar,
                   passphrase=passphrase)


def verified(store: Store, name: str) -> subprocess.CompletedProcess[str]:
    """`agentfs verify` of an agent's log in `store`."""
    return subprocess.run([*AGENTFS, "verify", "--store", str(store.path), name],
                          capture_output=True, text=True, timeout=60)


def same_words(path: Path, store: Store) -> Store:
    """A new store at `path` made from `store`'s mnemonic (a recovery)."""
    words = path.parent / f"{path.name}.words"
    words.write_text(store.mnemonic + "\n")
    done = subprocess.run([*AGENTFS, "init", "--mnemonic-file", str(words), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return Store(path, store.mnemonic)


def dump(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every key and value of every database of the store."""
    opened = AgentStore.open(store.path)
    try:
        with opened.read() as txn:
            return {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=opened.db[name])]
                    for name in DB_NAMES}
    finally:
        opened.close()


def members(tar: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
        return [(info, t.extractfile(info).read() if info.isreg() else None)  # type: ignore[union-attr]
                for info in t.getmembers()]


def rebuild(tar: bytes,
            change: Callable[[list[tuple[tarfile.TarInfo, bytes | None]]],
                             list[tuple[tarfile.TarInfo, bytes | None]]]) -> bytes:
    """The archive with its members changed by `change`, written again as a tar."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in change(members(tar)):
            if data is not None:
                info.size = len(data)
            t.addfile(info, None if data is None else io.BytesIO(data))
    return out.getvalue()


def manifest(tar: bytes) -> dict[str, Any]:
    data = dict((i.name, d) for i, d in members(tar))["manifest.json"]
    assert data is not None
    result: dict[str, Any] = json.loads(data)
    return result


# -- a store with two agents, mounted for the module -----------------------------------------


class Source:
    """Store A, mounted: alice (agent 0, no program, two messages pending) and bob (agent 1,
    with state, a log and outbox, an alarm, a budget, grants and a token)."""

    def __init__(self, mount: Mount) -> None:
        self.mount = mount
        mp = mount.mp
        self.alice = mount.new_agent("alice")
        for text in ("first", "second"):
            (mp / "alice" / "inbox").write_text(text + "\n")
        program = script(mp.parent, "bob.sh",
                         REPLY + 'echo "$trigger" > "$AGENT_DIR/state/d/last"\n')
        (mp / "secrets").write_text("example sk-not-a-real-key host=api.example.com\n")
        self.bob = mount.new_agent("bob", program)
        bob = mp / "bob"
        mount.created("bob")
        (bob / "state" / "d").mkdir()
        (bob / "state" / "d" / "e").mkdir()
        (bob / "state" / "d" / "e" / "note").write_bytes(b"\x00binary\xff\n")
        (bob / "state" / "top").write_text("top\n")
        ticks = int(mount.status("bob")["ticks"])
        (bob / "inbox").write_text("hello\n")
        mount.wait_ticks("bob", ticks + 1)
        (bob / "ctl").write_text("idle 1h\nalarm every 1h\ngrant net api.example.com\n"
                                 "grant secret example\ntoken tok-0123456789abcdef\n")
        (bob / "budget").write_text("max_tick_duration 7s\n")

    def read(self, name: str, file: str) -> str:
        return (self.mount.mp / name / file).read_text()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    base = tmp_path_factory.mktemp("archive")
    base.chmod(0o711)
    (base / "mnt").mkdir()
    mount = Mount(init_store(base / "a-store"), base / "mnt")
    try:
        yield Source(mount.start())
    finally:
        mount.stop()


@pytest.fixture(scope="module")
def bob_tar(source: Source) -> bytes:
    # By the mount point, beside the daemon: a read transaction of the live store.
    return export(str(source.mount.mp), "bob")


# -- same mnemonic ---------------------------------------------------------------------------


def test_an_archive_holds_each_member_once_with_its_checksum(bob_tar: bytes,
                                                             source: Source) -> None:
    got = members(bob_tar)
    names = [info.name for info, _ in got]
    assert names[:10] == ["manifest.json", "settings.json", "budget.json", "alarm.json",
                          "caps.json", "counters.json", "inbox", "seen", "outbox", "log"]
    assert sorted(names[10:]) == ["state/d", "state/d/e", "state/d/e/note", "state/d/last",
                                  "state/top"]
    m = manifest(bob_tar)
    assert (m["format"], m["version"], m["npub"], m["index"], m["name"]) == \
        ("agentfs-agent", 1, source.bob, 1, "bob")
    assert m["pubkey"] == npub_decode(source.bob).hex()
    assert [e["name"] for e in m["members"]] == names[1:]
    data = dict((i.name, d) for i, d in got)
    assert data["log"] == source.read("bob", "log").encode()
    assert data["outbox"] == source.read("bob", "outbox").encode()
    caps = json.loads(data["caps.json"] or b"")
    assert caps == {"grants": {"net": ["api.example.com"], "secret": ["example"]},
                    "secrets": [{"name": "example", "host": "api.example.com",
                                 "header": None}]}
    assert b"sk-not-a-real-key" not in bob_tar  # a secret's value never leaves its store
    assert "key.ncryptsec" not in names  # nor the key, unless asked for


def test_the_same_mnemonic_keeps_index_and_npub_and_everything_else(
        source: Source, bob_tar: bytes, make_mount: MountFactory, tmp_path: Path) -> None:
    b = same_words(tmp_path / "b-store", source.mount.store)
    done = import_(b, bob_tar)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == source.bob
    err = done.stderr.decode()
    assert f"imported bob {source.bob} as agent 1 (its key derived from this store's " \
        "mnemonic)" in err
    assert "secret example (host=api.example.com) is not in this store" in err
    alice_tar = export("--store", str(source.mount.store.path), "alice")
    done = import_(b, alice_tar)  # agent 0: below the next index, free, and its own
    assert done.returncode == 0, done.stderr.decode()

    mount = make_mount("b", store=b)
    a_mp, b_mp = source.mount.mp, mount.mp
    assert os.readlink(b_mp / "bob") == source.bob and os.readlink(b_mp / "alice") == \
        source.alice
    assert mount.uid("bob") == UID_BASE + 1 and mount.uid("alice") == UID_BASE
    a_ctl = (a_mp / "bob" / "ctl").read_text()
    assert (b_mp / "bob" / "ctl").read_text() == a_ctl
    assert (b_mp / "bob" / "outbox").read_text() == source.read("bob", "outbox")
    a_log, b_log = source.mount.log("bob"), mount.log("bob")
    assert b_log[:-1] == a_log and b_log[-1]["event"] == "import"
    # The budget too, but for the import's line in the log, which counts as storage.
    a_budget = dict(line.split(" ", 1) for line in source.read("bob", "budget").splitlines())
    b_budget = dict(line.split(" ", 1)
                    for line in (b_mp / "bob" / "budget").read_text().splitlines())
    import_line = (b_mp / "bob" / "log").read_bytes().splitlines(keepends=True)[-1]
    used = "used_storage_bytes"
    assert int(b_budget.pop(used)) == int(a_budget.pop(used)) + len(import_line)
    assert b_budget == a_budget and a_budget["max_tick_duration"] == "7s"
    assert (b_log[-1]["from_index"], b_log[-1]["key"]) == (1, "derived")
    # The archive's records keep their chain; the import's record goes on it, signed.
    checked = verified(b, "bob")
    assert checked.returncode == 0 and f"{len(b_log)} records check" in checked.stdout, \
        checked.stdout
    assert (b_mp / "alarms").read_text() == "".join(
        line + "\n" for line in (a_mp / "alarms").read_text().splitlines()
        if source.bob in line)
    for rel in ("d", "d/e", "d/e/note", "d/last", "top"):
        a, b_ = os.stat(a_mp / "bob" / "state" / rel), os.stat(b_mp / "bob" / "state" / rel)
        assert (a.st_mtime_ns, a.st_size, a.st_mode) == (b_.st_mtime_ns, b_.st_size, b_.st_mode)
    assert (b_mp / "bob" / "state" / "d" / "e" / "note").read_bytes() == b"\x00binary\xff\n"
    tokens = (b_mp / "tokens").read_text()
    assert tokens == (a_mp / "tokens").read_text() and "bob" in tokens

    # bob goes on ticking where it was; alice's pending messages run once it has a program.
    ticks = int(mount.status("bob")["ticks"])
    (b_mp / "bob" / "inbox").write_text("again\n")
    mount.wait_ticks("bob", ticks + 1)
    assert mount.outbox("bob")[-1]["data"] == "got again"
    assert mount.outbox("bob")[-1]["from"] == source.bob
    pending = mount.inbox("alice")
    assert [m["data"] for m in pending] == ["first", "second"]
    program = script(tmp_path, "alice.sh", REPLY)
    (b_mp / "alice" / "ctl").write_text(f"program {program}\n")
    out = wait_until(lambda: len(o := mount.outbox("alice")) == 2 and o, 30, "alice's answers")
    assert [(o["data"], o["in_reply_to"]) for o in out] == \
        [("got first", pending[0]["id"]), ("got second", pending[1]["id"])]

    # Numbers are never reused: the next agent here is agent 2 of the mnemonic.
    carol = mount.new_agent("carol")
    done = agentfs("id", "--mnemonic-file", "-", "--agent", "2",
                   stdin=b.mnemonic.encode())
    assert done.stdout.decode().split()[0] == carol

    # Import takes the store's lock: not beside its daemon.
    done = import_(b, bob_tar, "--name", "bob2")
    assert done.returncode == 1 and b"unmount it before importing" in done.stderr


# -- damaged archives and refusals -----------------------------------------------------------


def _without(name: str) -> Callable[[list[Any]], list[Any]]:
    return lambda ms: [(i, d) for i, d in ms if i.name != name]


def _with(name: str, edit: Callable[[bytes], bytes]) -> Callable[[list[Any]], list[Any]]:
    return lambda ms: [(i, edit(d) if i.name == name and d is not None else d) for i, d in ms]


def _version(data: bytes) -> bytes:
    m = json.loads(data)
    m["version"] = 2
    return json.dumps(m).encode()


def _extra(ms: list[Any]) -> list[Any]:
    info = tarfile.TarInfo("state/stowaway")
    return [*ms, (info, b"x")]


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "checksum": (lambda t: rebuild(t, _with("state/top", lambda d: d.upper())),
                 "member state/top does not match its checksum in the manifest"),
    "missing member": (lambda t: rebuild(t, _without("log")), "member log is missing"),
    "wrong version": (lambda t: rebuild(t, _with("manifest.json", _version)),
                      "archive version 2: this agentfs reads version 1"),
    "unlisted member": (lambda t: rebuild(t, _extra),
                        "member state/stowaway is not in the manifest"),
    "empty": (lambda t: b"", "not a complete tar archive"),
}


@pytest.fixture
def target(source: Source, tmp_path: Path) -> Store:
    """A store of the source's mnemonic, holding alice already."""
    store = same_words(tmp_path / "t-store", source.mount.store)
    alice = export("--store", str(source.mount.store.path), "alice")
    assert import_(store, alice).returncode == 0
    return store


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_archive_is_refused_and_changes_nothing(
        bob_tar: bytes, target: Store, damage: str) -> None:
    spoil, message = DAMAGE[damage]
    before = dump(target)
    done = import_(target, spoil(bob_tar))
    assert done.returncode == 1
    assert message in done.stderr.decode()
    assert dump(target) == before


def test_an_archive_cut_anywhere_is_refused_and_changes_nothing(
        bob_tar: bytes, target: Store) -> None:
    before = dump(target)
    infos = [info for info, _ in members(bob_tar)]
    end = infos[-1].offset_data + infos[-1].size  # then zeros: the end and the padding
    # Cuts inside headers and inside data, and between members (at the last one's header).
    for cut in [*range(100, end, 1500), infos[-1].offset]:
        done = import_(target, bob_tar[:cut])
        assert done.returncode == 1, cut
        err = done.stderr.decode()
        assert "not a complete tar archive" in err or "(the archive is incomplete: " \
            "truncated?)" in err, (cut, err)
    assert dump(target) == before


@pytest.mark.parametrize("case", ["name taken", "already here", "bad name", "no key"])
def test_an_archive_that_does_not_fit_is_refused_and_changes_nothing(
        bob_tar: bytes, target: Store, tmp_path: Path, case: str) -> None:
    args: tuple[str, ...] = ()
    store = target
    if case == "name taken":
        args, message = ("--name", "alice"), "name 'alice' is taken in this store (by agent 0)"
    elif case == "already here":
        assert import_(target, bob_tar).returncode == 0
        message = "is in this store already (agent 1, bob)"
    elif case == "bad name":
        args, message = ("--name=-x",), "name '-x': use 1-64 of"
    else:
        store = init_store(tmp_path / "other-store")
        message = "export it with --with-key to move it to a store of another mnemonic"
    before = dump(store)
    done = import_(store, bob_tar, *args)
    assert done.returncode == 1
    assert message in done.stderr.decode()
    assert dump(store) == before


def test_the_key_travels_only_encrypted_and_only_with_its_passphrase(
        source: Source, tmp_path: Path) -> None:
    tar = export("--store", str(source.mount.store.path), "--with-key", "bob",
                 passphrase=PASSPHRASE)
    data = dict((i.name, d) for i, d in members(tar))
    sealed = data["key.ncryptsec"] or b""
    assert sealed.startswith(b"ncryptsec1")
    listed = {e["name"]: e for e in manifest(tar)["members"]}["key.ncryptsec"]
    assert listed["sha256"] == hashlib.sha256(sealed).hexdigest()
    private = agent_private_key(source.mount.store.mnemonic, 1)
    assert nip49.decrypt(sealed.decode(), PASSPHRASE)[0] == private
    assert private not in tar and private.hex().encode() not in tar
    other = init_store(tmp_path / "other-store")
    before = dump(other)
    done = import_(other, tar, passphrase=PASSPHRASE + "!")
    assert done.returncode == 1 and b"wrong passphrase" in done.stderr
    # No passphrase anywhere else: without a terminal (a new session has none), it stops.
    done = agentfs("import", "--store", str(other.path), "-", stdin=tar,
                   start_new_session=True)
    assert done.returncode == 1
    assert b"no terminal to ask the passphrase on: give it with --passphrase-fd N" in \
        done.stderr
    assert dump(other) == before
    done = import_(other, tar, passphrase=PASSPHRASE)
    assert done.returncode == 0, done.stderr.decode()
    assert b"(its key imported, sealed in the store)" in done.stderr
    assert [k for k, _ in dump(other)["keys"]] == [b"\0\0\0\0"]  # agent 0 here
    raw = (other.path / "data.mdb").read_bytes()  # sealed: not in the file's plain bytes
    assert private not in raw and private.hex().encode() not in raw


def on_terminal(argv: list[str], answers: list[str], stdin: Path | None,
                stdout: Path) -> tuple[int, str]:
    """Run `argv` in a session whose controlling terminal is a pty, answering each
    passphrase prompt there in turn; (exit status, what the terminal showed)."""
    master, slave = os.openpty()

    def take_terminal() -> None:  # after setsid: the pty becomes the session's terminal
        fcntl.ioctl(2, termios.TIOCSCTTY, 0)

    with open(stdout, "wb") as out, open(stdin or os.devnull, "rb") as into:
        proc = subprocess.Popen(argv, stdin=into, stdout=out, stderr=slave,
                                start_new_session=True, preexec_fn=take_terminal)
    os.close(slave)
    shown, pending = b"", list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last holder of the terminal has gone
                break
            if not chunk:
                break
            shown += chunk
            if pending and shown.endswith(b": "):  # a prompt, waiting (getpass flushes
                # what was typed before it asks, so each answer waits for its prompt)
                os.write(master, pending.pop(0).encode() + b"\n")
        return proc.wait(30), shown.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_a_passphrase_fd_the_terminal_is_asked(source: Source, tmp_path: Path) -> None:
    tar = tmp_path / "bob.tar"
    status, shown = on_terminal([*AGENTFS, "export", "--store", str(source.mount.store.path),
                                 "--with-key", "bob"], [PASSPHRASE, PASSPHRASE], None, tar)
    assert status == 0, shown
    assert "passphrase for the agent's key:" in shown and "the same passphrase again:" in shown
    assert PASSPHRASE not in shown  # not echoed
    status, shown = on_terminal([*AGENTFS, "export", "--store", str(source.mount.store.path),
                                 "--with-key", "bob"], [PASSPHRASE, "other"], None,
                                tmp_path / "no.tar")
    assert status == 1 and "the two passphrases differ" in shown
    other = init_store(tmp_path / "other-store")
    status, shown = on_terminal([*AGENTFS, "import", "--store", str(other.path), "-"],
                                [PASSPHRASE], tar, tmp_path / "npub")
    assert status == 0, shown
    assert (tmp_path / "npub").read_text().strip() == source.bob
    assert "its key imported, sealed in the store" in shown


def test_export_refuses_a_terminal_an_unknown_agent_and_an_empty_passphrase(
        source: Source) -> None:
    store = str(source.mount.store.path)
    done = agentfs("export", "--store", store, "nobody")
    assert done.returncode == 1 and b"'nobody': no agent of that name or npub" in done.stderr
    done = agentfs("export", "--store", store, "--with-key", "bob", passphrase="")
    assert done.returncode == 1 and b"the passphrase is empty" in done.stderr
    assert done.stdout == b""
    done = agentfs("export", "--store", store, str(source.mount.mp), "bob")
    assert done.returncode == 1 and b"not both" in done.stderr


# -- another mnemonic: the agent answers at its old npub -------------------------------------


RULES = "dst matches 'npub1[02-9ac-hj-np-z]+'\nplumb to nostr\n"
ANSWER = """read -r t
case "$t" in *'"lifecycle":true'*) exit 0;; esac
echo "$t" >> "$0.seen"
printf 're: %s\\n' "$(printf '%s' "$t" | jq -r .data)"
"""


def test_an_agent_moved_to_a_store_of_another_mnemonic_answers_at_its_old_npub(
        make_mount: MountFactory, relay: Relay, drivers: Callable[..., NostrDriver],
        tmp_path: Path) -> None:
    human_secret = os.urandom(32)
    human = public_key(human_secret)

    def replies() -> list[Any]:
        return query(relay.url, {"kinds": [1059], "#p": [human.hex()]})

    def texts() -> list[tuple[str, bytes]]:
        return sorted((r.content, s) for r, s in (nip17.unwrap(human_secret, e)
                                                  for e in replies()))

    home = make_mount("home")
    (home.mp / "plumb" / "rules").write_text(RULES)
    (home.mp / "nostr" / "relays").write_text(relay.url + "\n")
    program = script(tmp_path, "dan.sh", ANSWER)
    npub = home.new_agent("dan", program)
    dan = npub_decode(npub)
    home.created("dan")
    driver = drivers(home, tmp_path / "home-driver.log")
    driver.wait_log(r"subscription agentfs-\d+ caught up")
    first = nip17.wrap(human_secret, dan, "before the move")
    publish(relay.url, first)
    wait_until(lambda: texts() == [("re: before the move", dan)], 30, "dan's first answer")
    assert driver.stop() == 0

    tar = export("--with-key", str(home.mp), "dan", passphrase=PASSPHRASE)
    home.stop()  # the old home says nothing more
    new_store = init_store(tmp_path / "new-store")
    assert new_store.mnemonic != home.store.mnemonic
    done = import_(new_store, tar, passphrase=PASSPHRASE)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == npub

    new = make_mount("new", store=new_store)
    (new.mp / "plumb" / "rules").write_text(RULES)  # the store's, not the agent's
    (new.mp / "nostr" / "relays").write_text(relay.url + "\n")
    assert os.readlink(new.mp / "dan") == npub_encode(dan)
    driver = drivers(new, tmp_path / "new-driver.log")
    # The relay hands the first DM over again (gift wraps are looked for two days back):
    # the moved agent's seen ids drop it.
    driver.wait_log(f"event {first.id} kind 1059 -> {npub}/inbox", 30)
    driver.wait_log(r"subscription agentfs-\d+ caught up")
    second = nip17.wrap(human_secret, dan, "after the move")
    publish(relay.url, second)
    wait_until(lambda: len(texts()) == 2, 30, "dan's answer from its new home")
    assert texts() == [("re: after the move", dan), ("re: before the move", dan)]
    seen = json_lines(Path(program + ".seen"))
    assert [t["data"] for t in seen] == ["before the move", "after the move"]
    assert [r["key"] for r in new.log("dan") if r["event"] == "import"] == ["imported"]
    # Its log's head is signed with its own key, which no mnemonic here derives.
    checked = verified(new.store, "dan")
    assert checked.returncode == 0 and npub in checked.stdout, checked.stdout
