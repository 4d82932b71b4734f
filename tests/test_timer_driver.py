"""The timer drivers (drivers/timer.py and drivers/timer.sh) against a real mount: alarms set
through ctl reach the agent's program once each, whatever stops meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, script, wait_until

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = {
    "python": [sys.executable, "-m", "drivers.timer"],
    "dash": ["dash", str(ROOT / "drivers/timer.sh")],
    "busybox": ["busybox", "sh", str(ROOT / "drivers/timer.sh")],
}
# dash is Debian's /bin/sh and mkfs.sh installs busybox: a missing shell fails its tests (see
# the `timer` fixture) rather than skipping them, which would pass unseen in CI.
ALL_KINDS = list(DRIVERS)
KINDS = ALL_KINDS[:2]

# The program notes every alarm trigger it gets in state/alarms, one JSON line each, and
# ignores the rest (lifecycle triggers: create, wake, sleep...).
PROGRAM = """
read -r trigger
case $trigger in *'"lifecycle":true'*) exit 0;; esac
case $trigger in *'"type":"alarm"'*) printf '%s\\n' "$trigger" >> "$AGENT_DIR/state/alarms";; esac
"""


@dataclass
class Timer:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def fired(self) -> list[str]:
        """The alarm ids of its `fired` lines."""
        return [line.split()[2] for line in self.text().splitlines()
                if line.startswith("timer: fired ")]

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum`; its exit status."""
        os.kill(self.proc.pid, signum)
        return self.proc.wait(timeout=10)


class Timers:
    """Starts the driver under test (`kind`) and keeps every process it started."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind, self.directory = kind, directory
        self.started: list[Timer] = []

    def __call__(self, mountpoint: Path, *args: str) -> Timer:
        log = self.directory / f"timer-{len(self.started)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([*DRIVERS[self.kind], *args, str(mountpoint)],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                    start_new_session=True)
        self.started.append(Timer(proc, log))
        return self.started[-1]

    def kill_all(self) -> None:
        for t in self.started:
            if t.proc.poll() is None:
                os.killpg(t.proc.pid, signal.SIGKILL)  # its session: a shell's sleep too
            t.proc.wait(timeout=10)


@pytest.fixture(params=KINDS)
def timer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Timers]:
    """timer(MOUNTPOINT, *args): the driver under test, started; all killed at the end.
    Python and dash by default; busybox too where a test asks for ALL_KINDS."""
    shell = DRIVERS[request.param][0]
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is not installed (./mkfs.sh --deps-only installs it)",
                    pytrace=False)
    timers = Timers(request.param, tmp_path)
    try:
        yield timers
    finally:
        timers.kill_all()


def fake_tree(tmp_path: Path) -> Path:
    """A plain directory laid out like a mount's root, for what needs no daemon."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "alarms").write_text("")
    return tree


def alarm_agent(mount: Mount, tmp_path: Path, name: str) -> Path:
    """An agent running PROGRAM, awake: its `create` has run."""
    program = tmp_path / "alarm-program.sh"
    if not program.exists():
        script(tmp_path, program.name, PROGRAM)
    mount.new_agent(name, str(program))
    agent = mount.agent(name)
    wait_until(lambda: mount.status(name)["status"] == "active", 10, f"{name} created")
    return agent


def set_alarm(agent: Path, how: str) -> None:
    (agent / "ctl").write_text(f"alarm {how}\n")


def seen(agent: Path) -> list[dict[str, Any]]:
    """The alarm triggers the agent's program got, in order."""
    try:
        text = (agent / "state/alarms").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def listed(mount: Mount) -> list[tuple[float, str, str]]:
    return [(float(due), npub, ident) for due, npub, ident in
            (line.split() for line in (mount.mp / "alarms").read_text().splitlines())]


def unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def dropped(mount: Mount, name: str) -> list[dict[str, Any]]:
    return [r for r in mount.log(name) if r["event"] == "alarm" and "dropped" in r]


# -- firing ------------------------------------------------------------------------------------


def test_alarm_fires_once_and_cancel_prevents(mount: Mount, timer: Timers,
                                              tmp_path: Path) -> None:
    a, b, c = (alarm_agent(mount, tmp_path, name) for name in "abc")
    driver = timer(mount.mp)
    set_alarm(a, "1s")
    set_alarm(b, "1s")
    set_alarm(b, "cancel")
    [(due, npub, ident)] = listed(mount)
    assert npub == os.readlink(a)
    [trigger] = wait_until(lambda: seen(a), 10, "a's alarm to reach its program")
    assert (trigger["type"], trigger["id"]) == ("alarm", ident)
    assert "missed" not in trigger
    assert unix(trigger["time"]) >= due - 0.001, "fired before its due time"
    assert mount.status("a")["alarm"] == "-"
    assert listed(mount) == []
    # c's alarm, set after a's firing, fires once the driver has read the file again.
    set_alarm(c, "1s")
    wait_until(lambda: seen(c), 10, "c's alarm")
    wait_until(lambda: len(driver.fired()) == 2, 10, "the driver's line for c")
    assert len(seen(a)) == 1 and driver.fired().count(ident) == 1
    assert f"fired {ident} for {npub} (late " in driver.text()
    assert dropped(mount, "a") == []
    assert seen(b) == [] and os.readlink(b) not in driver.text()


def test_every_fires_repeatedly(mount: Mount, timer: Timers, tmp_path: Path) -> None:
    a = alarm_agent(mount, tmp_path, "a")
    timer(mount.mp)
    set_alarm(a, "every 1s")
    triggers = wait_until(lambda: len(s := seen(a)) >= 2 and s, 10, "two firings")
    dues = [int(t["id"].removeprefix("alarm:").split(".")[0]) for t in triggers]
    assert all(later - earlier >= 1000 for earlier, later in zip(dues, dues[1:], strict=False))
    for t, due in zip(triggers, dues, strict=True):
        assert unix(t["time"]) >= due / 1000 - 0.001, "fired before its due time"
    assert mount.status("a")["alarm"].endswith(" every 1s")
    assert dropped(mount, "a") == []


def test_missed_periods_fire_once(mount: Mount, timer: Timers, tmp_path: Path) -> None:
    """Set while no driver runs, and three due times pass: one firing, with `missed`."""
    a = alarm_agent(mount, tmp_path, "a")
    set_alarm(a, "every 1s")
    [(due, _npub, ident)] = listed(mount)
    time.sleep(due + 2.05 - time.time())  # two more periods pass, and no driver
    assert timer(mount.mp, "--once").proc.wait(timeout=10) == 0
    [trigger] = wait_until(lambda: seen(a), 10, "the late firing")
    assert trigger["id"] == ident and trigger["missed"] >= 2, trigger
    [(following, _npub, _ident)] = listed(mount)
    assert following > time.time() - 1  # advanced past the downtime at once


def test_daemon_down_past_due(mount: Mount, timer: Timers, tmp_path: Path) -> None:
    a = alarm_agent(mount, tmp_path, "a")
    driver = timer(mount.mp)
    wait_until(lambda: "watching" in driver.text(), 10, "the driver to start")
    set_alarm(a, "1s")
    [(due, _npub, ident)] = listed(mount)
    mount.stop()
    wait_until(lambda: "cannot read" in driver.text(), 10, "the driver to see the mount gone")
    time.sleep(max(0.0, due - time.time()) + 0.2)  # past due with no daemon
    mount.start()
    [trigger] = wait_until(lambda: seen(a), 10, "the alarm after the restart")
    assert trigger["id"] == ident and "missed" not in trigger
    assert wait_until(lambda: driver.fired(), 10, "the driver's line") == [ident]
    assert "readable again" in driver.text()
    assert listed(mount) == [] and dropped(mount, "a") == []


def test_driver_killed_midflight(mount: Mount, timer: Timers, tmp_path: Path) -> None:
    """SIGKILL while a burst of alarms fires; a new driver fires the rest, none twice."""
    agents = [alarm_agent(mount, tmp_path, f"a{i}") for i in range(20)]
    for agent in agents:
        set_alarm(agent, "at 2026-01-01T00:00:00Z")  # all due at once
    first = timer(mount.mp)
    wait_until(lambda: first.fired(), 10, "the first firing")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    before = len(first.fired())
    assert before < len(agents), "killed only after the burst"
    second = timer(mount.mp)
    wait_until(lambda: all(seen(agent) for agent in agents), 15, "every alarm")
    assert [len(seen(agent)) for agent in agents] == [1] * len(agents)
    for agent in agents:
        ticks = [r for r in mount.log(agent.name) if r["event"] == "tick"]
        assert [r["trigger"]["type"] for r in ticks].count("alarm") == 1
    # The second driver fired what the first had not, but for the one the first was killed
    # writing (if that write had committed).
    fired = wait_until(lambda: len(f := second.fired()) >= len(agents) - before - 1 and f,
                       10, "the second driver's lines")
    assert len(fired) <= len(agents) - before
    assert listed(mount) == []


# -- the driver's side alone, on a plain directory laid out like the tree ----------------------


@pytest.mark.parametrize("timer", ALL_KINDS, indirect=True)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(timer: Timers, tmp_path: Path, signum: int) -> None:
    driver = timer(fake_tree(tmp_path), "--poll", "30")
    wait_until(lambda: "watching" in driver.text(), 10, "the driver to start")
    time.sleep(0.2)  # into its 30-second sleep
    start = time.monotonic()
    assert driver.stop(signum) == 0
    assert time.monotonic() - start < 1.5
    assert driver.text().splitlines()[-1] == f"timer: stopping ({signal.Signals(signum).name})"


def test_not_a_mount(timer: Timers, tmp_path: Path) -> None:
    driver = timer(tmp_path)
    assert driver.proc.wait(timeout=10) == 1
    assert f"{tmp_path} is not an agentfs mount" in driver.text()


@pytest.mark.parametrize("timer", ALL_KINDS, indirect=True)
def test_fires_once_while_listed(timer: Timers, tmp_path: Path) -> None:
    """Until an alarm leaves the file the driver does not write it again; an agent that is
    not there, and a line that is not an alarm, are logged once and skipped."""
    tree = fake_tree(tmp_path)
    alarms = tree / "alarms"
    one, two, three, gone = (f"npub1{c * 58}" for c in "qpsz")
    for npub in (one, two, three):
        (tree / npub).mkdir()
        (tree / npub / "inbox").write_text("")

    def relist(text: str) -> None:  # at once, as the daemon's file changes: never empty between
        (tree / "alarms.new").write_text(text)
        os.replace(tree / "alarms.new", alarms)

    def inbox(npub: str) -> list[str]:
        return (tree / npub / "inbox").read_text().splitlines()

    past = f"{time.time() - 5:.3f}"
    relist(f"{past} {one} alarm:1\n{past} {gone} alarm:2\nnonsense\n")
    # Python's driver re-reads in a tenth of a second; the shell's in whole seconds.
    driver = timer(tree, "--poll", "0.1" if timer.kind == "python" else "1")
    wait_until(lambda: inbox(one), 10, "the first firing")
    relist(alarms.read_text() + f"{past} {two} alarm:3\n")
    wait_until(lambda: inbox(two), 10, "the second firing")
    assert inbox(one) == ['{"type":"alarm","id":"alarm:1"}']
    text = driver.text()
    assert text.count(f"alarm:2 for {gone}: agent gone") == 1
    assert text.count("ignoring a line") == 1 and "'nonsense'" in text
    # Gone from the file (as the next firing shows the driver saw), then listed again: it
    # fires again.
    relist(f"{past} {two} alarm:3\n{past} {three} alarm:4\n")
    wait_until(lambda: inbox(three), 10, "the third firing")
    relist(f"{past} {one} alarm:1\n")
    wait_until(lambda: len(inbox(one)) == 2, 10, "the firing after the alarm was relisted")
    assert len(inbox(two)) == 1


def test_mount_gone_while_firing(timer: Timers, tmp_path: Path) -> None:
    """The mount vanishes between reading `alarms` and writing the inbox: the agent only
    looks gone, and its alarm fires when the mount is back."""
    tree = fake_tree(tmp_path)
    driver = timer(tree, "--poll", "0.1" if timer.kind == "python" else "1")
    wait_until(lambda: "watching" in driver.text(), 10, "the driver to start")
    os.mkfifo(tree / "alarms.fifo")
    os.replace(tree / "alarms.fifo", tree / "alarms")
    npub, line = f"npub1{'q' * 58}", f"{time.time() - 1:.3f} npub1{'q' * 58} alarm:7\n"
    fd = os.open(tree / "alarms", os.O_WRONLY)  # waits for the driver's next read
    try:
        os.write(fd, line.encode())
        os.unlink(tree / "alarms")  # the mount point is left empty, as at an unmount
    finally:
        os.close(fd)
    wait_until(lambda: f"alarm:7 for {npub}: No such file or directory; will retry"
               in driver.text(), 10, "the failed write")
    assert "agent gone" not in driver.text()
    (tree / npub).mkdir()
    (tree / npub / "inbox").write_text("")
    (tree / "alarms").write_text(line)  # the mount is back
    wait_until(lambda: driver.fired(), 10, "the alarm after the return")
    assert driver.fired() == ["alarm:7"]
    assert (tree / npub / "inbox").read_text() == '{"type":"alarm","id":"alarm:7"}\n'


# -- the daemon ----------------------------------------------------------------------------------


def test_alarm_wakes_a_dormant_agent(mount: Mount, tmp_path: Path) -> None:
    program = script(tmp_path, "p.sh", PROGRAM)
    mount.new_agent("a", program)
    a = mount.agent("a")
    (a / "ctl").write_text("idle 0\n")  # hibernates at once
    wait_until(lambda: mount.status("a")["status"] == "dormant", 10, "a to sleep")
    set_alarm(a, "at 2020-01-01T00:00:00Z")  # due already
    [(_due, _npub, ident)] = listed(mount)
    (a / "inbox").write_text(f'{{"type":"alarm","id":"{ident}"}}\n')
    wait_until(lambda: seen(a), 1, "the dormant agent's alarm to run")
