"""The mounted tree (agentfs(4)): layout, ctl, budget, inbox, read-only journals, secrecy."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import stat
import subprocess
from functools import partial
from pathlib import Path

import pytest
from conftest import (
    UID_BASE,
    Mount,
    Store,
    errno_of,
    json_lines,
    sh,
    wait_until,
    write_once,
)

from agentfs.identity import agent_private_key, npub_encode, nsec_encode, public_key
from agentfs.inbox import MAX_LINE

ROOT_FILES = ["alarms", "ctl", "nostr", "plumb", "secrets", "status", "tokens"]
AGENT_FILES = ["budget", "ctl", "head", "inbox", "log", "outbox", "state"]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def expected_npub(store: Store, n: int) -> str:
    return npub_encode(public_key(agent_private_key(store.mnemonic, n)))


def refusals(agent: Path) -> list[dict[str, object]]:
    """The agent's `refused` log records, picked out with jq as a user would."""
    out = sh(f"jq -c 'select(.event == \"refused\")' {agent}/log").stdout
    return [json.loads(line) for line in out.splitlines()]


# -- layout ----------------------------------------------------------------------------------


def test_layout(mount: Mount) -> None:
    mp = mount.mp
    assert sh(f"ls {mp}").stdout.split() == ROOT_FILES
    # For drivers, which run as the owner: no agent reads another's due alarms.
    assert stat.S_IMODE(os.stat(mp / "alarms").st_mode) == 0o400
    assert stat.S_IMODE(os.stat(mp / "tokens").st_mode) == 0o400
    assert stat.S_IMODE(os.stat(mp / "secrets").st_mode) == 0o600  # lists names, no values
    assert (mp / "alarms").read_text() == (mp / "tokens").read_text() == ""
    assert (mp / "secrets").read_text() == ""
    alice = mount.new_agent("alice")
    bob = mount.new_agent("bob", "/bin/cat")
    assert alice == expected_npub(mount.store, 0)
    assert bob == expected_npub(mount.store, 1)
    listed = [*ROOT_FILES, "alice", "bob", alice, bob]
    assert sorted(sh(f"ls {mp}").stdout.split()) == sorted(listed)
    assert sh(f"readlink {mp}/alice").stdout.strip() == alice
    assert os.readlink(mp / "bob") == bob
    assert os.path.islink(mp / "alice") and not os.path.islink(mp / alice)
    assert stat.S_ISDIR(os.stat(mp / alice).st_mode)
    assert sh(f"ls {mp}/alice/").stdout.split() == AGENT_FILES
    assert sorted(os.listdir(mp / bob)) == AGENT_FILES
    assert stat.S_ISDIR(os.stat(mp / alice / "state").st_mode)
    assert os.listdir(mp / alice / "state") == []
    # Names are resolved both ways to the same agent.
    assert os.stat(mp / "alice").st_ino == os.stat(mp / alice).st_ino
    assert errno_of(lambda: os.stat(mp / "carol")) == errno.ENOENT
    assert errno_of(lambda: os.stat(mp / alice / "nosuchfile")) == errno.ENOENT


def test_ctl_status_fields(mount: Mount) -> None:
    npub = mount.new_agent("alice")
    mount.new_agent("bob", "/bin/sh", "-c", "echo 'hi there'")
    lines = (mount.mp / "alice" / "ctl").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == \
        ["npub", "name", "status", "ticks", "pending", "last", "program", "retries", "idle",
         "serve", "hooks", "alarm", "token", "publish", "net", "secret", "tool", "spend",
         "sandbox", "uid"]
    # Without a program its create trigger cannot run: it stays creating.
    assert mount.status("alice") == {"npub": npub, "name": "alice", "status": "creating",
                                     "ticks": "0", "pending": "0", "last": "-", "program": "-",
                                     "retries": "3", "idle": "30s", "serve": "off", "hooks": "all",
                                     "alarm": "-", "token": "-", "publish": "none",
                                     "net": "-", "secret": "-", "tool": "-", "spend": "-",
                                     "sandbox": "on", "uid": str(UID_BASE)}  # agent 0
    assert mount.status("bob")["program"] == "/bin/sh -c 'echo '\"'\"'hi there'\"'\"''"


def test_root_ctl_new_returns_npubs_on_the_same_fd(mount: Mount) -> None:
    fd = os.open(mount.mp / "ctl", os.O_RDWR)
    try:
        os.write(fd, b"new a\nnew b /bin/true\n")
        reply = os.read(fd, 4096).decode()
        assert os.read(fd, 4096) == b""
    finally:
        os.close(fd)
    assert reply == f"{expected_npub(mount.store, 0)}\n{expected_npub(mount.store, 1)}\n"
    # A fresh fd reads nothing.
    assert (mount.mp / "ctl").read_text() == ""
    assert mount.status("b")["program"] == "/bin/true"


def test_root_ctl_reply_read_after_write_in_shell(mount: Mount) -> None:
    out = sh(f"exec 3<>{mount.mp}/ctl; echo 'new alice' >&3; cat <&3").stdout
    assert out == expected_npub(mount.store, 0) + "\n"


def test_new_duplicate_and_bad_names(mount: Mount) -> None:
    mp = mount.mp
    mount.new_agent("alice")
    done = sh(f"echo 'new alice' > {mp}/ctl", check=False)
    assert done.returncode != 0 and "File exists" in done.stderr
    assert errno_of(lambda: write_once(mp / "ctl", "new alice\n")) == errno.EEXIST
    # All or nothing: one bad line refuses the whole write.
    assert errno_of(lambda: write_once(mp / "ctl", "new bob\nnew alice\n")) == errno.EEXIST
    for bad in ["new .hidden", "new ctl", "new npub1abc", "new a/b", "new " + "x" * 65, "new",
                "create bob", "new 'unclosed", "new bob\nnew bob", "new plumb"]:
        assert errno_of(partial(write_once, mp / "ctl", bad + "\n")) == errno.EINVAL, bad
    listed = [*ROOT_FILES, "alice", expected_npub(mount.store, 0)]
    assert sorted(os.listdir(mp)) == sorted(listed)
    # The failed attempts did not use up agent numbers.
    assert mount.new_agent("bob") == expected_npub(mount.store, 1)


def test_root_file_names_are_no_agent_names(mount: Mount) -> None:
    # An agent named `tokens` would be a link in the root beside the file `tokens`.
    mp = mount.mp
    npub = mount.new_agent("alice")
    listed = sorted(os.listdir(mp))
    for name in [*ROOT_FILES, ".tick"]:
        for line in (f"new {name} /bin/true", f"new {name}"):
            assert errno_of(partial(write_once, mp / "ctl", line + "\n")) == errno.EINVAL, line
        assert errno_of(partial(write_once, mp / npub / "ctl", f"name {name}\n")) == \
            errno.EINVAL, name
    assert sorted(os.listdir(mp)) == listed  # nothing created, nothing renamed
    assert mount.status("alice")["name"] == "alice"
    assert not any(os.path.islink(mp / name) for name in ROOT_FILES)
    assert (mp / "tokens").read_text() == ""  # still the root's file: no agent has a token
    why = ("the root has a file of that name (reserved: .tick alarms ctl nostr plumb secrets "
           "status tokens)")
    daemon_log = (mount.store.path / "daemon.log").read_text()
    for name in [*ROOT_FILES, ".tick"]:
        assert f"refused write root ctl: name {name!r}: {why}" in daemon_log, name
    renames = [r for r in refusals(mp / npub) if r["op"] == "write ctl"]
    assert [r["error"] for r in renames] == [f"name {n!r}: {why}" for n in [*ROOT_FILES, ".tick"]]
    # The next agent still gets the next number.
    assert mount.new_agent("bob") == expected_npub(mount.store, 1)


# -- agent ctl ---------------------------------------------------------------------------------


def test_bad_agent_ctl_is_einval_and_logged(mount: Mount) -> None:
    agent = mount.mp / mount.new_agent("alice")
    mount.new_agent("bob")
    done = sh(f"echo frobnicate > {agent}/ctl", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    bad = ["name", "name a b", "name .x", "sleep now", "terminate 1", "program",
           "program 'unclosed", "", "\n\n", "wake hi\nbogus"]
    for text in bad:
        assert errno_of(partial(write_once, agent / "ctl", text + "\n")) == errno.EINVAL, text
    refused = refusals(agent)
    assert len(refused) == 1 + len(bad)
    assert all(r["errno"] == "EINVAL" and r["op"] == "write ctl" for r in refused)
    assert "frobnicate" in str(refused[0]["error"])
    # Nothing was applied: `wake hi` came with a bad line, so it was refused with it.
    status = mount.status("alice")
    assert (status["name"], status["pending"], status["program"]) == ("alice", "0", "-")
    # A name another agent holds: EEXIST, and nothing else in that write applied.
    assert errno_of(lambda: write_once(agent / "ctl", "program /bin/true\nname bob\n")) == \
        errno.EEXIST
    assert mount.status("alice")["program"] == "-"
    # And the good verbs work.
    write_once(agent / "ctl", "name alice2\nprogram /bin/echo 'a b'\n")
    assert os.readlink(mount.mp / "alice2") == status["npub"]
    assert errno_of(lambda: os.lstat(mount.mp / "alice")) == errno.ENOENT
    assert mount.status("alice2")["program"] == "/bin/echo 'a b'"
    assert mount.created("alice2")["status"] == "active"  # with a program, its create ran
    write_once(agent / "ctl", "sleep\n")
    assert mount.status("alice2")["status"] == "dormant"
    write_once(agent / "ctl", "terminate\n")
    assert mount.status("alice2")["status"] == "terminated"


# -- budget ------------------------------------------------------------------------------------


def budget(agent: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (agent / "budget").read_text().splitlines())


def test_budget_defaults_and_units(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    b = budget(agent)
    assert {k: b[k] for k in ["max_tick_duration", "max_daily_compute", "max_storage_bytes",
                              "max_daily_api_calls", "max_daily_spend_sats",
                              "warning_threshold"]} == {
        "max_tick_duration": "30s", "max_daily_compute": "1h", "max_storage_bytes": "100000000",
        "max_daily_api_calls": "1000", "max_daily_spend_sats": "10000",
        "warning_threshold": "0.8"}
    for key in ["used_daily_compute", "used_storage_bytes", "used_daily_api_calls",
                "used_daily_spend_sats"]:
        assert key in b
    sh(f"echo 'max_tick_duration 1500ms' > {agent}/budget")
    sh(f"printf 'max_daily_compute 2h\\nmax_storage_bytes 1MiB\\n' > {agent}/budget")
    sh(f"echo 'max_daily_api_calls 5' > {agent}/budget")
    b = budget(agent)
    assert (b["max_tick_duration"], b["max_daily_compute"], b["max_storage_bytes"],
            b["max_daily_api_calls"]) == ("1.5s", "2h", "1048576", "5")
    for written, shown in [("max_tick_duration 45", "45s"), ("max_tick_duration 1h", "1h"),
                           ("max_tick_duration 30s", "30s"),
                           ("max_storage_bytes 100MB", "100000000"),
                           ("max_storage_bytes 2KB", "2000"), ("warning_threshold 0.5", "0.5")]:
        write_once(agent / "budget", written + "\n")
        key = written.split()[0]
        assert budget(agent)[key] == shown, written
    logged = [r for r in mount.log("alice") if r["event"] == "budget"]
    assert logged[-1]["set"] == {"warning_threshold": "0.5"}


def test_bad_budget_is_einval_and_changes_nothing(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    write_once(agent / "budget", "max_tick_duration 10s\n")
    before, log_before = budget(agent), (agent / "log").stat().st_size
    bad = ["max_tick_duration 5x", "max_tick_duration", "max_tick_duration 1 s",
           "max_tick_duration -1s", "max_tick_duration 0", "max_storage_bytes 1.5B",
           "max_storage_bytes 10furlongs", "max_daily_api_calls 1.5", "warning_threshold 2",
           "bogus_key 5", "used_storage_bytes 0", "max_tick_duration 20s\nnonsense 1", ""]
    for text in bad:
        assert errno_of(partial(write_once, agent / "budget", text + "\n")) == errno.EINVAL, \
            text
    done = sh(f"echo 'max_tick_duration forever' > {agent}/budget", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    after = budget(agent)
    # Only the log changed, by the refusals' records, which count in the storage used.
    grown = (agent / "log").stat().st_size - log_before
    assert int(after.pop("used_storage_bytes")) - int(before.pop("used_storage_bytes")) == grown
    assert after == before
    assert after["max_tick_duration"] == "10s"
    refused = refusals(agent)
    assert len(refused) == len(bad) + 1
    assert all(r["errno"] == "EINVAL" for r in refused)


# -- inbox -------------------------------------------------------------------------------------


def test_inbox_text_and_json_lines(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    sh(f"echo hello > {agent}/inbox")
    sh(f"echo '{{\"type\":\"note\",\"data\":[1,2],\"id\":\"m-1\",\"from\":\"npub1x\"}}' "
       f">> {agent}/inbox")
    write_once(agent / "inbox", "two\n  \nlines\n")
    messages = json_lines(agent / "inbox")
    assert [(m["type"], m["data"]) for m in messages] == \
        [("text", "hello"), ("note", [1, 2]), ("text", "two"), ("text", "lines")]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4]
    assert messages[1]["id"] == "m-1" and messages[1]["from"] == "npub1x"
    ids = [m["id"] for m in messages]
    assert len(set(ids)) == 4 and all(isinstance(i, str) and i for i in ids)
    assert all(RFC3339.match(m["time"]) for m in messages)
    assert mount.status("alice")["pending"] == "4"
    # Reading again gives the same pending messages.
    assert json_lines(agent / "inbox") == messages


def test_inbox_bad_json_is_einval(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    for data in [b'{"type": "text", "data": \n', b"{not json}\n", b'ok\n{"a":\n', b"\xff\xfe\n"]:
        assert errno_of(partial(write_once, agent / "inbox", data)) == errno.EINVAL, data
    done = sh(f"echo '{{oops' > {agent}/inbox", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert (agent / "inbox").read_text() == ""
    assert mount.status("alice")["pending"] == "0"
    assert len(refusals(agent)) == 5


def test_inbox_partial_line_waits_for_newline_or_close(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    fd = os.open(agent / "inbox", os.O_WRONLY)
    try:
        os.write(fd, b"par")
        os.write(fd, b"tial")
        assert mount.status("alice")["pending"] == "0"
        os.write(fd, b" line\nand the ")
        assert [m["data"] for m in mount.inbox("alice")] == ["partial line"]
        os.write(fd, b"rest")
        assert mount.status("alice")["pending"] == "1"
    finally:
        os.close(fd)
    assert [m["data"] for m in mount.inbox("alice")] == ["partial line", "and the rest"]
    # The same through Python's buffered file: one message at close.
    with open(agent / "inbox", "w") as f:
        f.write('{"type":"x","data":"no newline"}')
    assert mount.inbox("alice")[-1]["data"] == "no newline"


def test_a_long_line_in_small_pieces_arrives_whole(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    line = b"".join(b"%07d," % i for i in range(MAX_LINE // 8))  # MAX_LINE bytes: allowed
    assert len(line) == MAX_LINE
    fd = os.open(agent / "inbox", os.O_WRONLY)
    try:
        for at in range(0, len(line), 4096):
            assert os.write(fd, line[at:at + 4096]) == 4096
        assert os.write(fd, b"\nnext\n") == 6
    finally:
        os.close(fd)
    assert [m["data"].encode() for m in mount.inbox("alice")] == [line, b"next"]


def test_a_line_past_the_limit_is_refused_and_dropped(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    before = mount.rss()
    piece = b"x" * 65536
    fd = os.open(agent / "inbox", os.O_WRONLY)
    try:
        sent = 0
        with pytest.raises(OSError) as refused:
            while sent < 4 * MAX_LINE:  # one line, far past the limit, until refused
                sent += os.write(fd, piece)
        assert refused.value.errno == errno.EMSGSIZE
        assert sent == MAX_LINE  # the write that passed it was the one refused
        # Dropped: not held, and the rest of the line does not pass for a line of its own.
        grown = mount.rss() - before
        assert grown < MAX_LINE + (8 << 20), f"the daemon grew by {grown} bytes"
        assert errno_of(lambda: os.write(fd, b"the end of it\nnext\n")) == errno.EMSGSIZE
    finally:
        os.close(fd)
    assert mount.inbox("alice") == []
    refused_records = refusals(agent)
    assert [r["errno"] for r in refused_records] == ["EMSGSIZE", "EMSGSIZE"]
    assert f"a line over {MAX_LINE} bytes" in str(refused_records[0]["error"])
    write_once(agent / "inbox", "another open file\n")  # takes lines again
    assert [m["data"] for m in mount.inbox("alice")] == ["another open file"]


# -- outbox and log ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["outbox", "log"])
def test_journals_are_read_only_from_outside(mount: Mount, name: str) -> None:
    mount.new_agent("alice")
    path = mount.agent("alice") / name
    before = path.read_bytes()
    for flags in [os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_WRONLY | os.O_TRUNC]:
        assert errno_of(partial(write_once, path, '{"a":1}\n', flags)) == errno.EACCES
    for command in [f"echo '{{}}' > {path}", f"echo x >> {path}", f"truncate -s 0 {path}"]:
        done = sh(command, check=False)
        assert done.returncode != 0 and "Permission denied" in done.stderr, command
    assert errno_of(lambda: os.truncate(path, 0)) == errno.EACCES
    assert errno_of(lambda: os.unlink(path)) in (errno.EACCES, errno.EPERM)
    if name == "outbox":
        assert path.read_bytes() == before == b""
    else:
        assert path.read_bytes().startswith(before)
    assert any(r["errno"] == "EACCES" for r in refusals(mount.agent("alice")))


def test_log_offsets_are_stable_as_it_grows(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    log = agent / "log"
    first = log.read_bytes()
    fd = os.open(log, os.O_RDONLY)
    try:
        assert os.read(fd, 1 << 20) == first
        for i in range(20):
            write_once(agent / "ctl", f"wake number {i}\n")
        second = log.read_bytes()
        assert second.startswith(first) and len(second) > len(first)
        # The reader that kept its offset reads exactly what was appended.
        assert os.read(fd, 1 << 20) == second[len(first):]
        assert os.read(fd, 1 << 20) == b""
        assert os.fstat(fd).st_size == len(second)
        # tail -c +N: from any byte offset, mid-line or not.
        for n in [1, len(first) + 1, len(first) + 5, len(second) - 3, len(second) + 1]:
            assert sh(f"tail -c +{n} {log}").stdout.encode() == second[n - 1:], n
        # Random-access reads see the same bytes as the whole file.
        for off in range(0, len(second), 37):
            assert os.pread(fd, 50, off) == second[off:off + 50]
    finally:
        os.close(fd)
    lines = json_lines(log)
    assert [r["command"] for r in lines if r["event"] == "ctl"] == \
        [f"wake number {i}" for i in range(20)]


def test_tail_follows_the_log(mount: Mount) -> None:
    mount.new_agent("alice")
    agent = mount.agent("alice")
    tail = subprocess.Popen(["tail", "-s", "0.02", "-n", "+1", "-f", str(agent / "log")],
                            stdout=subprocess.PIPE)
    assert tail.stdout is not None
    out = tail.stdout.fileno()
    seen = b""

    def saw(text: bytes) -> bool:
        nonlocal seen
        while select.select([out], [], [], 0)[0]:
            chunk = os.read(out, 65536)
            if not chunk:
                break
            seen += chunk
        return text in seen

    try:
        wait_until(lambda: saw(b'"event":"create"'), 10, "tail to print the create record")
        write_once(agent / "ctl", "wake followed\n")
        wait_until(lambda: saw(b"wake followed"), 10, "tail -f to print the new record")
    finally:
        tail.kill()
        tail.wait()
    assert seen == (agent / "log").read_bytes()


# -- the store's files and secrets -------------------------------------------------------------


def test_store_files_are_private(mount: Mount) -> None:
    path = mount.store.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    core = ["data.mdb", "lock.mdb", "daemon.pid"]
    for name in core:
        assert stat.S_IMODE(os.stat(path / name).st_mode) == 0o600, name


def test_daemon_log_is_private(mount: Mount) -> None:
    assert stat.S_IMODE(os.stat(mount.store.path / "daemon.log").st_mode) == 0o600


def test_secrets_never_appear_in_the_tree_or_logs(mount: Mount, tmp_path: Path) -> None:
    program = tmp_path / "prog.sh"
    program.write_text('#!/bin/sh\ncat > "$AGENT_DIR/state/trigger"\nenv\necho done\n')
    program.chmod(0o755)
    npub = mount.new_agent("alice", str(program))
    mount.new_agent("bob")
    sh(f"echo hello > {mount.mp}/alice/inbox; echo 'wake up' > {mount.mp}/bob/ctl")
    mount.wait_ticks("alice", 2)  # its create, then hello
    secrets = [mount.store.mnemonic]
    for n in range(2):
        private = agent_private_key(mount.store.mnemonic, n)
        secrets += [nsec_encode(private), private.hex()]
    # The words are the secret, whatever whitespace separates them.
    secrets.append(" ".join(mount.store.mnemonic.split()[:6]))
    patterns = tmp_path / "secrets"
    patterns.write_text("\n".join(secrets) + "\n")
    found = sh(f"grep -r -l -i -F -f {patterns} {mount.mp} {mount.store.path}/daemon.log",
               check=False)
    assert found.returncode == 1, found.stdout + found.stderr
    # grep did read the tree: the agent's own files are there to be found.
    seen = sh(f"grep -r -l -F {npub} {mount.mp}").stdout.split()
    assert f"{mount.mp}/{npub}/ctl" in seen and f"{mount.mp}/{npub}/outbox" in seen
