"""Regressions for bugs found in review: each of these once killed the daemon or lost data."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from conftest import READ_TRIGGER, Mount, errno_of, pid_alive, wait_until, write_once


def test_a_name_that_is_not_utf8(mount: Mount) -> None:
    mount.new_agent("alice")
    state = os.fsencode(mount.agent("alice") / "state")
    assert errno_of(lambda: os.stat(state + b"/\xff")) == errno.ENOENT
    assert errno_of(lambda: os.stat(os.fsencode(mount.mp) + b"/\xff")) == errno.ENOENT
    assert errno_of(lambda: os.open(state + b"/\xff", os.O_CREAT | os.O_WRONLY)) == errno.EINVAL
    assert pid_alive(mount.pid) and mount.status("alice")["status"] == "creating"


def test_a_nul_byte_in_a_program_is_refused(mount: Mount) -> None:
    mount.new_agent("alice")
    ctl = mount.agent("alice") / "ctl"
    assert errno_of(lambda: write_once(ctl, b"program /bin/true\0x\n")) == errno.EINVAL
    assert errno_of(lambda: write_once(mount.mp / "ctl", b"new b\0b\n")) == errno.EINVAL
    assert mount.status("alice")["program"] == "-"


def test_programs_that_ignore_their_input_do_not_fail(mount: Mount) -> None:
    mount.new_agent("alice", "/bin/true")
    write_once(mount.agent("alice") / "inbox", "x\n" * 200)
    mount.wait_ticks("alice", 201, timeout=60)  # its create, then the 200
    assert not [r for r in mount.log("alice") if r.get("result") == "error"]


def test_a_refused_inbox_write_keeps_nothing(mount: Mount) -> None:
    mount.new_agent("alice")
    fd = os.open(mount.agent("alice") / "inbox", os.O_WRONLY)
    try:
        assert errno_of(lambda: os.write(fd, b"{bad\nhello")) == errno.EINVAL
    finally:
        os.close(fd)
    assert mount.inbox("alice") == []


def test_a_tick_reads_its_own_ctl_and_inbox_writes(mount: Mount, tmp_path: Path) -> None:
    program = tmp_path / "self.sh"
    program.write_text("#!/bin/sh\n" + READ_TRIGGER + """
case "$trigger" in *later*) exit 0 ;; esac
echo "name renamed" > "$AGENT_DIR/ctl"
echo later >> "$AGENT_DIR/inbox"
grep '^name ' "$AGENT_DIR/ctl" > "$1/ctl"
grep -c later "$AGENT_DIR/inbox" > "$1/inbox"
""")
    program.chmod(0o755)
    mount.new_agent("alice", str(program), str(tmp_path))
    write_once(mount.agent("alice") / "inbox", "go\n")
    wait_until(lambda: (mount.mp / "renamed").exists())
    mount.wait_ticks("renamed", 3)  # its create, go, later
    assert (tmp_path / "ctl").read_text() == "name renamed\n"
    assert (tmp_path / "inbox").read_text() == "1\n"
