"""The plumber in the mounted tree: plumb/rules, plumb/send, ports, and routing of outboxes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import READ_TRIGGER, Mount, errno_of, pid_alive, sh, wait_until, write_once

from plumber import Message

RULES = """\
# to agents by their names
type is text
data matches '(hello|hi) .*'
plumb to alice

# posts, for the web driver
type is post
plumb to http
"""


def open_files(pid: int) -> list[str]:
    fds = f"/proc/{pid}/fd"
    return [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]


def read_port(path: Path) -> tuple[int, dict[str, object]]:
    """Open a port, read one message; returns the open fd (unacknowledged) and the message."""
    fd = os.open(path, os.O_RDWR)
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(fd, 4096)
    return fd, json.loads(line)


def test_rules_replace_atomically_and_refuse_syntax_errors(mount: Mount) -> None:
    rules = mount.mp / "plumb" / "rules"
    assert rules.read_text() == ""
    write_once(rules, RULES)
    assert rules.read_text() == RULES
    # Ports named by the rules are files, but for those that name agents.
    assert sorted(os.listdir(mount.mp / "plumb")) == ["alice", "http", "rules", "send"]
    mount.new_agent("alice")
    assert sorted(os.listdir(mount.mp / "plumb")) == ["http", "rules", "send"]
    done = sh(f"printf 'type is\\n' > {rules}", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert errno_of(lambda: write_once(rules, "plumb to\n")) == errno.EINVAL
    assert rules.read_text() == RULES  # the old rules stay


def test_send_routes_to_an_agent_inbox(mount: Mount) -> None:
    npub = mount.new_agent("alice")
    write_once(mount.mp / "plumb" / "rules", RULES)
    sh(f"""echo '{{"src":"me","type":"text","data":"hello world","attr":{{"k":"v"}}}}' \
        > {mount.mp}/plumb/send""")
    wire = Message(src="plan9", dst="", wdir="/tmp", type="text", attr={}, data="hi there")
    write_once(mount.mp / "plumb" / "send", wire.to_wire())
    inbox = mount.inbox("alice")
    assert [(m["data"], m["from"]) for m in inbox] == [("hello world", "me"), ("hi there", "plan9")]
    assert inbox[0]["attr"] == {"k": "v"} and inbox[0]["dst"] == "alice"
    assert npub.startswith("npub1")


def test_a_message_no_rule_routes_is_refused(mount: Mount) -> None:
    mount.new_agent("alice")
    write_once(mount.mp / "plumb" / "rules", RULES)
    send = mount.mp / "plumb" / "send"
    assert errno_of(lambda: write_once(send, '{"type":"text","data":"goodbye"}\n')) == \
        errno.EINVAL
    # All or nothing: one unroutable message refuses the write.
    both = '{"type":"text","data":"hello a"}\n{"type":"text","data":"nope"}\n'
    assert errno_of(lambda: write_once(send, both)) == errno.EINVAL
    assert mount.inbox("alice") == []


def test_ports_hand_out_messages_until_acknowledged(mount: Mount) -> None:
    write_once(mount.mp / "plumb" / "rules", RULES)
    for n in (1, 2):
        message = json.dumps({"type": "post", "data": f"m{n}"}) + "\n"
        write_once(mount.mp / "plumb" / "send", message)
    port = mount.mp / "plumb" / "http"
    fd, first = read_port(port)
    assert first["data"] == "m1" and first["type"] == "post"
    os.close(fd)  # a reader that dies before delivering: m1 is handed out again
    fd, again = read_port(port)
    assert again["id"] == first["id"]
    os.write(fd, f"ack {again['id']}\n".encode())
    _fd2, second = read_port(port)
    assert second["data"] == "m2"
    assert errno_of(lambda: os.write(fd, b"ack no-such-id\n")) == errno.EINVAL
    os.close(fd)
    os.close(_fd2)
    fd, still = read_port(port)  # m2 was never acknowledged
    assert still["data"] == "m2"
    os.close(fd)


def test_a_blocked_reader_wakes_when_a_message_arrives(mount: Mount) -> None:
    write_once(mount.mp / "plumb" / "rules", RULES)
    with subprocess.Popen(["head", "-n", "1", str(mount.mp / "plumb" / "http")],
                          stdout=subprocess.PIPE) as reader:
        write_once(mount.mp / "plumb" / "send", '{"type":"post","data":"late"}\n')
        out, _ = reader.communicate(timeout=15)
    assert json.loads(out)["data"] == "late"


def test_an_agents_outbox_goes_through_the_rules(mount: Mount, tmp_path: Path) -> None:
    program = tmp_path / "post.sh"
    program.write_text("#!/bin/sh\n" + READ_TRIGGER + """
echo '{"type":"post","data":"posted"}' >> "$AGENT_DIR/outbox"
echo '{"to":"nowhere","type":"text","data":"lost"}' >> "$AGENT_DIR/outbox"
""")
    program.chmod(0o755)
    npub = mount.new_agent("poster", str(program))
    write_once(mount.mp / "plumb" / "rules", RULES)
    write_once(mount.agent("poster") / "inbox", "go\n")
    mount.wait_ticks("poster", 2)  # its create, then go
    fd, message = read_port(mount.mp / "plumb" / "http")
    os.close(fd)
    assert (message["src"], message["data"]) == (npub, "posted")
    undelivered = [r for r in mount.log("poster") if r["event"] == "undelivered"]
    assert [r["to"] for r in undelivered] == ["nowhere"]


def test_the_plumb_command(mount: Mount) -> None:
    mount.new_agent("alice")
    write_once(mount.mp / "plumb" / "rules", RULES)
    plumb = [sys.executable, "-m", "plumber.cli", "-m", str(mount.mp)]
    done = subprocess.run([*plumb, "-a", "lang=en k='a b'", "hello one", "hi two"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    inbox = mount.inbox("alice")
    assert [m["data"] for m in inbox] == ["hello one", "hi two"]
    assert inbox[0]["attr"] == {"lang": "en", "k": "a b"} and inbox[0]["from"] == "plumb"
    refused = subprocess.run([*plumb, "goodbye"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "Invalid argument" in refused.stderr
    piped = subprocess.run([*plumb, "-t", "post", "-i"], input="from stdin",
                           capture_output=True, text=True, timeout=30)
    assert piped.returncode == 0
    fd, message = read_port(mount.mp / "plumb" / "http")
    os.close(fd)
    assert message["data"] == "from stdin" and message["type"] == "post"


def test_rules_written_line_by_line(mount: Mount) -> None:
    rules = mount.mp / "plumb" / "rules"
    fd = os.open(rules, os.O_WRONLY | os.O_TRUNC)
    try:
        for line in RULES.splitlines(keepends=True):
            os.write(fd, line.encode())  # each line its own write(2), as shells often do
    finally:
        os.close(fd)
    assert rules.read_text() == RULES


def test_truncating_the_rules_empties_them_and_appending_nothing_does_not(
        mount: Mount) -> None:
    rules = mount.mp / "plumb" / "rules"
    write_once(rules, RULES)
    sh(f": >> {rules}")  # opened without O_TRUNC, nothing written: unchanged
    assert rules.read_text() == RULES
    sh(f": > {rules}")  # bash flushes before it would write: emptied only at release
    wait_until(lambda: rules.read_text() == "", 5, "the rules to be emptied")
    assert sorted(os.listdir(mount.mp / "plumb")) == ["rules", "send"]


def test_sigterm_with_a_reader_waiting_on_a_port(mount: Mount) -> None:
    write_once(mount.mp / "plumb" / "rules", RULES)
    with subprocess.Popen(["cat", str(mount.mp / "plumb" / "http")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        wait_until(lambda: any(path.endswith("plumb/http") for path in open_files(reader.pid)))
        os.kill(mount.pid, signal.SIGTERM)
        # Sooner than PORT_WAIT: shutting down wakes the waiting read at once.
        wait_until(lambda: not pid_alive(mount.pid), timeout=4)
        reader.kill()
