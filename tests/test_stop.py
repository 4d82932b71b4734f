"""Stopping the daemon while its ticks are busy in the mount: SIGTERM, SIGINT, SIGHUP,
`umount MOUNTPOINT` and `fusermount3 -u MOUNTPOINT` each end it within a bounded time, leave
no mount and no process of an agent behind, and roll back every unfinished tick as a crash
would (its trigger stays pending, no failure is counted, its writes are not committed).

Each round mounts a fresh store, starts agents whose ticks hold files of the mount open and
keep the daemon busy (a write loop on an open state file, reads of inbox and log under a
`tail -f` of the log, a big state file in many small writes, appends that reopen a file each
time), waits until each has begun and one of them is inside a write request, stops the mount,
and mounts the store again to see the triggers rerun and commit.  Sandboxed (the default) and
unconfined (-o sandbox=off), where each tick is the daemon's own child: killed with a file of
the mount open, it waits in the kernel for the daemon to answer its last flush.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AGENT_PYTHON,
    READ_TRIGGER,
    Mount,
    MountFactory,
    live_processes,
    pid_alive,
    processes_of,
    script,
    sh,
    wait_until,
    write_once,
)

ROUNDS = 4
ROUNDS_UNCONFINED = 1  # -o sandbox=off: the daemon used to hang in the first round already
# The daemon kills the ticks at once and serves FUSE until they are gone (5 s at most,
# daemon.STOP_WAIT), then ends: past this bound, with the tick grace, it has hung.
EXIT_BOUND = 10.0
SEED = "committed\n"  # state/x as committed from outside before the tick that is killed

# $1: the round's directory (shared with the ticks), $2: the agent's name.  Once $1/rerun
# exists (the test makes it after the daemon has gone), a tick records its trigger there and
# commits a result; before, it writes state/partial and then runs its kind's busy part,
# which never ends by itself.
PREAMBLE = READ_TRIGGER + """
dir=$1 name=$2
if [ -e "$dir/rerun" ]; then
    printf '%s\\n' "$trigger" > "$dir/$name.rerun"
    echo rerun > "$AGENT_DIR/state/result"
    echo "rerun done"
    exit 0
fi
echo "killed tick" > "$AGENT_DIR/state/partial"
echo "a reply of the killed tick"
"""

BUSY = {
    # Keeps state/x open for writing and writes to it without end.
    "writer": """
exec 3> "$AGENT_DIR/state/x"
echo partial >&3
echo $$ > "$dir/$name.begun"
while :; do echo partial >&3; done
""",
    # Holds the log open (tail -f) and reads inbox, log and ctl over and over.
    "reader": """
tail -f "$AGENT_DIR/log" > /dev/null &
while :; do
    cat "$AGENT_DIR/inbox" "$AGENT_DIR/log" "$AGENT_DIR/ctl" > /dev/null
    [ -e "$dir/$name.begun" ] || echo $$ > "$dir/$name.begun"
done
""",
    # A big state file (1 MiB) in small writes, rewritten without end.
    "big": f"\nexec {AGENT_PYTHON}" + """ - "$dir" "$name" <<'EOF'
import os, sys
fd = os.open(os.environ["AGENT_DIR"] + "/state/big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
chunk = b"b" * 1023 + b"\\n"
i = 0
while True:
    os.pwrite(fd, chunk, (i % 1024) * 1024)
    i += 1
    if i == 64:
        with open(os.path.join(sys.argv[1], sys.argv[2] + ".begun"), "w") as f:
            f.write(f"{os.getpid()}\\n")
EOF
""",
    # Appends small records to a state file it reopens each time (open, write, close).
    "appender": """
while :; do
    echo record >> "$AGENT_DIR/state/appended"
    [ -e "$dir/$name.begun" ] || echo $$ > "$dir/$name.begun"
done
""",
}
# Which files of the mount each kind's processes hold open once it has begun.
HOLDS = {"writer": "/state/x", "reader": "/log", "big": "/state/big"}
WRITERS = ("writer", "big", "appender")  # one of them is inside a write at the stop


def stop_by(way: str, mount: Mount, sandboxed: bool) -> None:
    """Unconfined, the ticks' open files keep the mount busy in our own mount namespace:
    only a lazy unmount (-l, -z) can take it away meanwhile."""
    lazy = "" if sandboxed else {"umount": " -l", "fusermount3": " -z"}.get(way, "")
    if way.startswith("SIG"):
        os.kill(mount.pid, getattr(signal, way))
    elif way == "umount":
        sh(f"umount{lazy} {mount.mp}", timeout=EXIT_BOUND)
    else:
        sh(f"fusermount3 -u{lazy} {mount.mp}", timeout=EXIT_BOUND)


def mounted(mp: Path) -> bool:
    """Whether /proc/self/mountinfo has an entry for `mp` (of any type, stale or not)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mp) for line in f)


def in_session(sid: int) -> list[int]:
    """The live processes of session `sid`: an unconfined tick's."""
    return live_processes(lambda f: int(f[b"NSsid"].split()[0]) == sid)


class Agents:
    """The round's agents, and how to find their processes: by uid in the sandbox, by
    session (each program leads one) with -o sandbox=off."""

    def __init__(self, mount: Mount, here: Path, sandboxed: bool) -> None:
        self.mount, self.here, self.sandboxed = mount, here, sandboxed
        self.uids: dict[str, int] = {}
        self.sessions: dict[str, int] = {}

    def created(self, kind: str) -> None:
        status = self.mount.created(kind)
        assert status["status"] == "active", (status, self.mount.log(kind))
        assert status["sandbox"] == ("on" if self.sandboxed else "off")
        if self.sandboxed:
            self.uids[kind] = self.mount.uid(kind)

    def begun(self, kind: str) -> bool:
        """Whether the tick has begun its busy part (its marker holds its pid)."""
        try:
            text = (self.here / f"{kind}.begun").read_text()
        except FileNotFoundError:
            return False
        if not text.endswith("\n"):
            return False
        self.sessions[kind] = int(text)
        return True

    def processes(self, kind: str) -> list[int]:
        if self.sandboxed:
            return processes_of(self.uids[kind])
        return in_session(self.sessions[kind])

    def open_files(self, kind: str) -> list[str]:
        """What the kind's processes have open (as paths in their own mount view)."""
        found = []
        for pid in self.processes(kind):
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        return found

    def in_fuse_request(self, kind: str) -> bool:
        """Whether a process of the kind waits for the daemon's answer to a FUSE request."""
        for pid in self.processes(kind):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/wchan") as f:
                if f.read().startswith("request_wait_answer"):
                    return True
        return False


def records(mount: Mount, name: str, event: str = "tick") -> list[dict[str, Any]]:
    return [r for r in mount.log(name) if r["event"] == event]


def run_round(make_mount: MountFactory, tmp_path: Path, way: str, number: int,
              sandboxed: bool, uid_base: int) -> None:
    # Sandboxed, a uid range of this round's own: processes_of must not see the agents of
    # other mounts (of other tests running meanwhile) that have the default uids.
    args = ("-o", f"uid_base={uid_base}") if sandboxed else ("-o", "sandbox=off")
    mount = make_mount(f"r{number}", args=args)
    here = tmp_path / f"r{number}"
    here.mkdir()
    here.chmod(0o777)
    agents = Agents(mount, here, sandboxed)
    for kind, body in BUSY.items():  # their create ticks run at once
        mount.new_agent(kind, script(tmp_path, f"{kind}.sh", PREAMBLE + body), str(here), kind)
    for kind in BUSY:
        agents.created(kind)
        (mount.agent(kind) / "state/x").write_text(SEED)
        write_once(mount.agent(kind) / "inbox",
                   json.dumps({"id": f"{kind}-{number}", "data": "go"}) + "\n")

    wait_until(lambda: all(agents.begun(k) for k in BUSY), 30, "every tick to begin")
    for kind, suffix in HOLDS.items():
        wait_until(lambda k=kind, s=suffix: any(p.endswith(s) for p in agents.open_files(k)),
                   15, f"{kind}'s tick to hold {suffix} open")
    wait_until(lambda: any(agents.in_fuse_request(k) for k in WRITERS), 15,
               "a tick to be inside a write request")

    daemon = mount.pid
    started = time.monotonic()
    stop_by(way, mount, sandboxed)
    wait_until(lambda: not pid_alive(daemon), EXIT_BOUND, f"the daemon to exit after {way}")
    assert time.monotonic() - started < EXIT_BOUND
    assert not os.path.ismount(mount.mp)
    assert not mounted(mount.mp), f"{mount.mp} is still in /proc/self/mountinfo"
    for kind in BUSY:
        wait_until(lambda k=kind: not agents.processes(k), 5, f"{kind}'s processes to be gone")
    said = (mount.store.path / "daemon.log").read_text()
    if way.startswith("SIG"):
        assert f"signal {getattr(signal, way).value}: unmounting" in said
    else:
        assert f"{mount.mp}: no longer mounted here (umount): stopping" in said

    # Mounted again, every trigger is still there for its first attempt, and its rerun
    # commits; nothing the killed ticks wrote or printed was kept.
    (here / "rerun").touch()
    mount.start()
    for kind in BUSY:
        status = mount.wait_ticks(kind, 2, timeout=30)
        assert status["pending"] == "0", status
        assert status["last"].endswith(" ok"), status
        trigger = json.loads((here / f"{kind}.rerun").read_text())
        assert trigger["id"] == f"{kind}-{number}"
        assert trigger["attempt"] == 1, trigger  # the kill counted no failure
        agent = mount.agent(kind)
        assert sorted(os.listdir(agent / "state")) == ["result", "x"]
        assert (agent / "state/result").read_text() == "rerun\n"
        assert (agent / "state/x").read_text() == SEED
        ticks = records(mount, kind)
        assert [(r["result"], r["trigger"].get("type")) for r in ticks] == \
            [("ok", "create"), ("ok", "text")], ticks
        assert ticks[1]["trigger"]["id"] == f"{kind}-{number}"
        assert [m["data"] for m in mount.outbox(kind)] == ["rerun done"]
    mount.stop()


WAYS = ["SIGTERM", "SIGINT", "SIGHUP", "umount", "fusermount3"]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_stop_while_ticks_are_busy_in_the_mount(make_mount: MountFactory, tmp_path: Path,
                                                sandbox: str, way: str) -> None:
    base = 0x40000000 + random.randrange(1 << 12) * (1 << 16)
    for number in range(ROUNDS if sandbox == "on" else ROUNDS_UNCONFINED):
        run_round(make_mount, tmp_path, way, number, sandbox == "on", base + number * 256)
