"""Running under systemd (agentfs(8)): the sd_notify protocol of the daemon and the HTTP driver
against a real NOTIFY_SOCKET this test binds, the shipped units through `systemd-analyze
verify`, and a mount through `mount -t fuse.agentfs` ended by `umount`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import AGENTFS, Mount, Store, json_lines, new_agent, pid_alive, sh, wait_until

from agentfs.notify import ServiceNotifier

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "agentfs" / "systemd"
VENV_BIN = Path(sys.executable).parent
# Answers each message with whether NOTIFY_SOCKET reached it; lets lifecycle triggers pass.
ANSWER_NOTIFY = ("read -r m; case $m in *lifecycle\\\":true*) exit 0;; esac; "
                 "echo \"notify: ${NOTIFY_SOCKET-unset}\"")


# -- a NOTIFY_SOCKET, as the service manager binds it ---------------------------------------


@dataclass
class Notification:
    pid: int  # the sender's, from SCM_CREDENTIALS: systemd's NotifyAccess=main checks it
    fields: dict[str, str]


class NotifyListener:
    """An AF_UNIX datagram socket taking notifications, with each sender's pid."""

    def __init__(self, address: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.setblocking(False)
        # How NOTIFY_SOCKET names it: the path, or '@' for an abstract name's leading NUL.
        self.name = "@" + address[1:].decode() if address[:1] == b"\0" else address.decode()
        self.received: list[Notification] = []

    def drain(self) -> list[Notification]:
        """What has arrived so far (all of it, from the start)."""
        ucred = struct.calcsize("iII")
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred))
            except BlockingIOError:
                return self.received
            pid = 0
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", raw[:ucred])[0]
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            self.received.append(Notification(pid, fields))

    def wait_for(self, key: str, value: str = "1", timeout: float = 30.0) -> Notification:
        """The first notification with key=value (a regular expression), once it is there."""

        def found() -> Notification | None:
            return next((n for n in self.drain()
                         if key in n.fields and re.fullmatch(value, n.fields[key])), None)

        return wait_until(found, timeout, f"a notification {key}={value}")

    def with_key(self, key: str) -> list[Notification]:
        return [n for n in self.drain() if key in n.fields]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A NOTIFY_SOCKET at a path, as systemd's /run/systemd/notify."""
    found = NotifyListener(os.fsencode(tmp_path / "notify"))
    try:
        yield found
    finally:
        found.close()


@contextlib.contextmanager
def foreground_daemon(store: Store, mp: Path, log: Path,
                      **environment: str) -> Iterator[subprocess.Popen[bytes]]:
    """`agentfs mount -f`, as agentfs@.service runs it, with `environment` added (a
    NOTIFY_SOCKET, say); at the end, stopped if it still runs, and its mount cleared."""
    args = [*AGENTFS, "mount", "-f", "--store", str(store.path), *Mount(store, mp).sandbox_args(),
            str(mp)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env={**os.environ, **environment}, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=30)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


def answered(mp: Path, name: str, text: str) -> bool:
    outbox = mp / name / "outbox"
    return outbox.exists() and any(m["data"] == text for m in json_lines(outbox))


# -- the daemon ------------------------------------------------------------------------------


def test_daemon_is_ready_once_served_reports_status_and_stops_at_sigterm(
        store: Store, tmp_path: Path, listener: NotifyListener) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    with foreground_daemon(store, mp, tmp_path / "daemon.log",
                           NOTIFY_SOCKET=listener.name) as daemon:
        ready = listener.wait_for("READY")
        # Served, not merely mounted: the tree answers as READY=1 arrives.
        assert os.path.ismount(mp) and "ctl" in os.listdir(mp)
        assert ready.pid == daemon.pid
        assert ready.fields["STATUS"] == f"serving {mp}: agents 0, awake 0, ticks running 0"
        new_agent(mp, "echo", "/bin/sh", "-c", ANSWER_NOTIFY)
        sh(f"echo hello > {mp}/echo/inbox")
        # Taken out of the daemon's environment: no tick can speak for the service.
        wait_until(lambda: answered(mp, "echo", "notify: unset"), 30, "echo's answer")
        # The figures change, and STATUS= says so (it looks every few seconds).
        listener.wait_for("STATUS", rf"serving {re.escape(str(mp))}: agents 1, .*")
        assert [n.fields for n in listener.with_key("READY")] == [ready.fields]
        assert not listener.with_key("STOPPING")
        daemon.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING")
        assert stopping.pid == daemon.pid and stopping.fields["STATUS"].startswith("stopping")
        assert daemon.wait(timeout=20) == 0
    assert not os.path.ismount(mp)
    assert len(listener.with_key("STOPPING")) == 1
    assert not listener.with_key("WATCHDOG")  # no WATCHDOG_USEC, no pings
    assert {n.pid for n in listener.drain()} == {daemon.pid}


def test_daemon_pings_the_watchdog_and_stops_at_umount(
        store: Store, tmp_path: Path, listener: NotifyListener) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    # 0.2 s: a ping every 0.1 s, half of it, as sd_watchdog_enabled(3) advises.
    with foreground_daemon(store, mp, tmp_path / "daemon.log", NOTIFY_SOCKET=listener.name,
                           WATCHDOG_USEC="200000") as daemon:
        listener.wait_for("READY")
        seen = len(listener.with_key("WATCHDOG"))
        wait_until(lambda: len(listener.with_key("WATCHDOG")) >= seen + 5, 30,
                   "five more watchdog pings")
        assert {n.pid for n in listener.with_key("WATCHDOG")} == {daemon.pid}
        assert {n.fields["WATCHDOG"] for n in listener.with_key("WATCHDOG")} == {"1"}
        sh(f"umount {mp}")
        listener.wait_for("STOPPING")
        assert daemon.wait(timeout=20) == 0
    assert not os.path.ismount(mp)


# -- the HTTP driver -------------------------------------------------------------------------


def test_http_driver_is_ready_once_it_listens_and_stops_at_sigterm(mount: Mount,
                                                                   tmp_path: Path) -> None:
    # An abstract name this time, written with '@' as systemd may hand it over.
    abstract = NotifyListener(f"\0agentfs-test-notify-{os.getpid()}-{id(tmp_path)}".encode())
    log = tmp_path / "http.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "drivers.http", "--listen", "127.0.0.1:0", str(mount.mp)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": abstract.name})
        try:
            ready = abstract.wait_for("READY")
            assert ready.pid == proc.pid
            found = re.fullmatch(rf"listening on http://127\.0\.0\.1:(\d+) for "
                                 rf"{re.escape(str(mount.mp))}", ready.fields["STATUS"])
            assert found, ready.fields
            # Listening as READY=1 arrives: a connection is taken at once.
            socket.create_connection(("127.0.0.1", int(found[1])), timeout=10).close()
            proc.send_signal(signal.SIGTERM)
            stopping = abstract.wait_for("STOPPING")
            assert stopping.pid == proc.pid
            assert proc.wait(timeout=15) == 0
            assert len(abstract.with_key("READY")) == 1, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
    finally:
        abstract.close()


# -- the notifier's reading of the environment -----------------------------------------------


def test_notifier_takes_its_variables_out_of_the_environment() -> None:
    environ = {"NOTIFY_SOCKET": "@bus", "WATCHDOG_USEC": "3000000",
               "WATCHDOG_PID": str(os.getpid()), "HOME": "/root"}
    notifier = ServiceNotifier(environ)
    assert notifier.address == b"\0bus" and notifier.watchdog_interval == 1.5
    assert environ == {"HOME": "/root"}  # so that no program we start inherits them


@pytest.mark.parametrize(("environ", "address", "interval"), [
    ({}, None, None),
    ({"NOTIFY_SOCKET": "/run/systemd/notify"}, b"/run/systemd/notify", None),
    ({"NOTIFY_SOCKET": "@/org/sd/notify"}, b"\0/org/sd/notify", None),
    ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1000000"}, b"/run/n", 0.5),
    # The watchdog of the process that execed us, not ours.
    ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"},
     b"/run/n", None),
    ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "soon"}, b"/run/n", None),
    ({"WATCHDOG_USEC": "1000000"}, None, None),  # nowhere to send the pings
    ({"NOTIFY_SOCKET": "vsock:2:1234"}, None, None),  # not a kind this client speaks
    ({"NOTIFY_SOCKET": "@"}, None, None),
])
def test_notifier_reads_the_environment(environ: dict[str, str], address: bytes | None,
                                        interval: float | None,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "agentfs"):
        notifier = ServiceNotifier(dict(environ))
    assert notifier.address == address and notifier.watchdog_interval == interval
    given = environ.get("NOTIFY_SOCKET")
    assert bool(caplog.records) == (given is not None and address is None)


def test_notifier_without_a_listener_warns_once(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The service goes on without its manager: a failed send is logged, once."""
    notifier = ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    with caplog.at_level(logging.WARNING, "agentfs"):
        notifier.ready("serving")
        notifier.status("still serving")
        notifier.stopping("stopping")
        notifier.stopping("stopping again")
    assert [r.getMessage() for r in caplog.records] == [
        "NOTIFY_SOCKET: cannot notify the service manager: No such file or directory"]
    assert notifier.stopping_sent
    notifier.close()


# -- the units -------------------------------------------------------------------------------


def unit_commands(text: str) -> list[str]:
    """The programs of a unit's ExecStart= lines."""
    return [line.split("=", 1)[1].split()[0] for line in text.splitlines()
            if line.startswith("ExecStart=")]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Each unit, as the instance of an escaped store path and of a name with a .conf.
    systemd looks commands up in its own fixed PATH, where this test's venv is not: the
    copies name the venv's commands by absolute path, and the commands are checked to be
    the package's console scripts, so nothing else differs from the shipped units."""
    assert shutil.which("systemd-analyze"), "systemd-analyze: install Debian's systemd"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    units = sorted(UNITS.glob("*@.service"))
    assert [u.name for u in units] == ["agentfs-http@.service", "agentfs-nostr@.service",
                                       "agentfs-timer@.service", "agentfs@.service"]
    escaped = sh("systemd-escape --path /var/lib/agents").stdout.strip()
    assert escaped == "var-lib-agents"
    instances = []
    for unit in units:
        text = unit.read_text()
        for command in unit_commands(text):
            assert command in scripts, f"{unit.name}: {command} is not a console script"
            text = text.replace(f"ExecStart={command} ", f"ExecStart={VENV_BIN / command} ")
        (tmp_path / unit.name).write_text(text)
        (tmp_path / unit.name).chmod(0o644)  # as installed: systemd warns of a writable one
        for instance in (escaped, "demo"):
            name = unit.name.replace("@.", f"@{instance}.")
            (tmp_path / name).symlink_to(unit.name)
            instances.append(name)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *instances],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # verify exits 0 on an unknown key or a bad dependency too, saying so on stderr.
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_example_conf_sets_what_the_units_read() -> None:
    read = set()
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        read |= set(re.findall(r"\$\{?([A-Z_]+)\}?", text))
        assert "EnvironmentFile=-/etc/agentfs/%i.conf" in text, unit.name
    conf = (UNITS / "example.conf").read_text()
    given = {line.split("=", 1)[0] for line in conf.splitlines()
             if line and not line.startswith("#")}
    assert given == read == {"STORE", "MOUNTPOINT", "OPTIONS", "TIMER_ARGS", "HTTP_ARGS",
                             "NOSTR_ARGS"}


# -- mount(8) --------------------------------------------------------------------------------

# Run in a mount namespace of its own: mount(8) hands its helpers no PATH, so mount.fuse3's
# /bin/sh finds `agentfs` in /usr/local/bin whatever this test's PATH says.  This venv's
# command is bound over /usr/local/bin there alone (never the machine's own link, which
# other checkouts' tests may use), and every mount made stays there.  Each round mounts,
# runs a tick of a new agent, unmounts with umount, and sees the daemon gone.
MOUNT_T = r"""
set -eu
mount --bind "$BIN" /usr/local/bin
round() {
    name=$1; shift
    "$@"
    pid=$(cat "$STORE/daemon.pid")
    echo "daemon $pid $(tr '\0' ' ' < /proc/$pid/cmdline)"
    grep " $MP fuse.agentfs " /proc/mounts | cut -d' ' -f1-3
    printf 'new %s /bin/sh -c %s\n' "$name" "'$PROGRAM'" > "$MP/ctl"
    echo hello > "$MP/$name/inbox"
    tries=0
    until jq -e -s 'any(.[]; .data == "notify: unset")' "$MP/$name/outbox" > /dev/null; do
        tries=$((tries + 1)); [ "$tries" -lt 300 ] || { echo "$name: no answer" >&2; exit 1; }
        sleep 0.1
    done
    echo "$name answered"
    umount "$MP"
    tries=0
    while kill -0 "$pid" 2> /dev/null; do
        tries=$((tries + 1)); [ "$tries" -lt 300 ] || { echo "the daemon runs on" >&2; exit 1; }
        sleep 0.1
    done
    if grep -q " $MP " /proc/self/mountinfo; then echo "still mounted" >&2; exit 1; fi
    echo "$name: daemon gone"
}
round by-type mount -t fuse.agentfs -o "$OPTIONS" "$STORE" "$MP"
echo "$STORE $MP fuse.agentfs $OPTIONS 0 0" > "$FSTAB"
round by-fstab mount -T "$FSTAB" "$MP"
"""


def test_mount_t_fuse_agentfs_and_fstab_tick_and_umount_ends_the_daemon(
        store: Store, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "agentfs").symlink_to(VENV_BIN / "agentfs")
    options = ",".join(["defaults", *Mount(store, mp).sandbox_args()[1:]])
    environment = {**os.environ, "BIN": str(bin_dir), "STORE": str(store.path), "MP": str(mp),
                   "OPTIONS": options, "PROGRAM": ANSWER_NOTIFY,
                   "FSTAB": str(tmp_path / "fstab")}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                           MOUNT_T], capture_output=True, text=True, timeout=240,
                          env=environment)
    pids = [int(line.split()[1]) for line in done.stdout.splitlines()
            if line.startswith("daemon ")]
    for pid in pids:  # the script failed with its daemon running: end it
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(map(pid_alive, pids)), 10, "the daemons to be gone")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8, lines
    for name, first in (("by-type", 0), ("by-fstab", 4)):
        # mount.fuse3 ran this venv's command, which ran the daemon with this venv's Python.
        assert Path(lines[first].split()[2]).parent == VENV_BIN, lines[first]
        assert lines[first + 1] == f"{store.path} {mp} fuse.agentfs"
        assert lines[first + 2:first + 4] == [f"{name} answered", f"{name}: daemon gone"]
    log = (store.path / "daemon.log").read_text()
    assert log.count("no longer mounted here (umount): stopping") == 2
    assert log.count(f"unmounted {mp}") == 2 and "Traceback" not in log
    assert (store.path / "daemon.pid").read_text() == ""
