"""Fixtures for tests that mount a real store: init, mount, always unmount, check the daemon log.

Level of these tests (s3ql's t4): `agentfs init` and `agentfs mount` run as subprocesses, the
mount is driven with shell tools and plain `os` calls, and every mount is unmounted with
`fusermount3 -u -z` whatever happened in the test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from relay import relay  # noqa: F401  (the fixture: a real Nostr relay)

AGENTFS = [sys.executable, "-m", "agentfs"]
# The Python for agents' programs: the system's, which the sandbox shows (the test runner's
# own interpreter may live in a home directory, which it does not).
AGENT_PYTHON = "/usr/bin/python3"
UID_BASE = 0x70000000  # agentfs.sandbox.DEFAULT_UID_BASE
T = TypeVar("T")

# Each store's daemon.log, and how far the checklogs guard has read it.
_LOGS_CHECKED: dict[Path, int] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "traceback_expected: the daemon may log a Traceback in this test")


# -- small helpers ---------------------------------------------------------------------------


def sh(command: str, check: bool = True, timeout: float = 60,
       **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a bash command line; with `check`, fail the test showing its stderr.

    bash, not dash: dash reports every failed write as "I/O error", hiding the errno.
    """
    done = subprocess.run(command, shell=True, executable="/bin/bash", capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"`{command}` exited {done.returncode}: {done.stderr.strip()}")
    return done


def wait_until(predicate: Callable[[], T | Literal[False] | None], timeout: float = 15.0,
               what: str = "") -> T:
    """Poll `predicate` every few ms until it returns something true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


def live_processes(where: Callable[[dict[bytes, bytes]], bool]) -> list[int]:
    """The live processes (not zombies) whose /proc/PID/status fields satisfy `where`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        fields = {k: v.strip() for k, _, v in (line.partition(b":")
                                                for line in status.splitlines())}
        if not fields.get(b"State", b"Z").startswith(b"Z") and where(fields):
            found.append(int(name))
    return found


def processes_of(uid: int) -> list[int]:
    """The live processes that run as `uid`: an agent's, sandboxed."""
    return live_processes(lambda f: int(f[b"Uid"].split()[0]) == uid)


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone: it runs nothing and holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return False
    return raw[raw.rfind(b")") + 2:][:1] != b"Z"


class InboxWriter(threading.Thread):
    """Writes JSON messages with unique ids to an inbox, one write(2) each, from a thread,
    noting which were acknowledged (the write returned) for crash tests to check."""

    def __init__(self, inbox: Path, prefix: str, count: int, kind: str = "text") -> None:
        super().__init__(daemon=True)
        self.inbox, self.prefix, self.count, self.kind = inbox, prefix, count, kind
        self.attempted: list[str] = []
        self.acked: list[str] = []

    def run(self) -> None:
        try:
            fd = os.open(self.inbox, os.O_WRONLY)
        except OSError:
            return  # the daemon is gone already
        try:
            for i in range(self.count):
                ident = f"{self.prefix}-{i}"
                line = json.dumps({"id": ident, "type": self.kind, "data": i}).encode() + b"\n"
                self.attempted.append(ident)
                if os.write(fd, line) == len(line):
                    self.acked.append(ident)
        except OSError:
            pass  # the daemon is gone
        finally:
            with contextlib.suppress(OSError):  # close cannot reach a dead daemon
                os.close(fd)


# A test program's first lines where the test is not about lifecycle triggers (create, wake,
# sleep, terminate, error): read the trigger, and commit an empty tick for a lifecycle one.
READ_TRIGGER = """read -r trigger
case "$trigger" in *'"lifecycle":true'*) exit 0 ;; esac
"""


def script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def release_fifo(fifo: Path, unlink: bool = False) -> None:
    """Let a program blocked reading `fifo` go on (waiting for it to open the fifo first);
    with `unlink`, the fifo is gone before the program reads on, so it waits no more."""

    def opened() -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader yet
                return None
            raise

    fd = wait_until(opened, 15, f"a reader on {fifo}")
    try:
        if unlink:
            os.unlink(fifo)
        os.write(fd, b"go\n")
    finally:
        os.close(fd)


def write_once(path: Path | str, data: bytes | str, flags: int = os.O_WRONLY) -> int:
    """open, one write(2), close: returns what write returned; errors raise OSError."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, flags)
    try:
        return os.write(fd, raw)
    finally:
        os.close(fd)


def errno_of(call: Callable[[], object]) -> int:
    """The errno `call` fails with (the test fails if it succeeds)."""
    try:
        call()
    except OSError as e:
        assert e.errno is not None
        return e.errno
    raise AssertionError(f"{call} succeeded; an error was expected")


def new_agent(mp: Path, name: str, *program: str) -> str:
    """`new NAME PROGRAM...` written to MP/ctl; the npub read back through the same fd."""
    line = shlex.join(["new", name, *program]) + "\n"
    fd = os.open(mp / "ctl", os.O_RDWR)
    try:
        assert os.write(fd, line.encode()) == len(line.encode())
        reply = b""
        while chunk := os.read(fd, 4096):
            reply += chunk
    finally:
        os.close(fd)
    npub = reply.decode().strip()
    assert npub.startswith("npub1") and "\n" not in npub, reply
    return npub


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ctl_status(agent_dir: Path) -> dict[str, str]:
    status = {}
    for line in (agent_dir / "ctl").read_text().splitlines():
        key, _, value = line.partition(" ")
        status[key] = value
    return status


# -- stores and mounts -------------------------------------------------------------------------


@dataclass
class Store:
    path: Path
    mnemonic: str


def init_store(path: Path) -> Store:
    done = subprocess.run([*AGENTFS, "init", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    _LOGS_CHECKED[path / "daemon.log"] = 0
    return Store(path, done.stdout.strip())


@dataclass
class Mount:
    """A live mount of `store` on `mp`, served by the daemon `pid`."""

    store: Store
    mp: Path
    pid: int = 0
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> Mount:
        _LOGS_CHECKED.setdefault(self.store.path / "daemon.log", 0)
        done = subprocess.run([*AGENTFS, "mount", "--store", str(self.store.path),
                               *self.sandbox_args(), *self.extra_args, str(self.mp)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"mount failed: {done.stderr}"
        assert os.path.ismount(self.mp)
        self.pid = int((self.store.path / "daemon.pid").read_text())
        assert pid_alive(self.pid)
        return self

    def sandbox_args(self) -> list[str]:
        """Tests keep their agents' programs, the fifos they wait on and what they report
        beside the mount point: that directory is shared with every tick (read-write), the
        test harness's one channel into the sandbox, which is on, as it is by default."""
        if any(word in arg for arg in self.extra_args
               for word in ("tools=", "shared=", "sandbox=off")):
            return []
        # The mount point's directory is a test's tmp_path, or a module's; its parent is
        # the session's temporary directory, where every test's tmp_path lies.
        self.mp.parent.chmod(self.mp.parent.stat().st_mode & 0o777 | 0o711)
        self.mp.parent.parent.chmod(0o755)
        return ["-o", f"shared={self.mp.parent.parent}"]

    def stop(self) -> None:
        """Unmount (lazily, so it works even with a dead daemon) and see the daemon gone."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.mp)], capture_output=True,
                       timeout=30)
        if self.pid:
            deadline = time.monotonic() + 5
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if pid_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
                wait_until(lambda: not pid_alive(self.pid), 10, "the daemon to die")
            self.pid = 0

    def restart(self) -> Mount:
        self.stop()
        return self.start()

    def kill(self) -> None:
        """kill -9 the daemon, as a crash would; the mount is left dead until stop()."""
        os.kill(self.pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(self.pid), 10, "the killed daemon to go")

    def rss(self) -> int:
        """The daemon's resident memory now, in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")

    def agent(self, name: str) -> Path:
        return self.mp / name

    def new_agent(self, name: str, *program: str) -> str:
        return new_agent(self.mp, name, *program)

    def uid(self, name: str) -> int:
        """The uid agent `name`'s ticks run as."""
        return int(self.status(name)["uid"])

    def processes_of(self, name: str) -> list[int]:
        """The live processes of agent `name` in this mount's sandbox: of its uid, and in
        the PID namespace of bwrap's children (other mounts' agents may share the uid)."""
        uid, namespace = self.uid(name), self._sandbox_pid_namespace()
        return [pid for pid in processes_of(uid) if _pid_namespace(pid) == namespace]

    def _sandbox_pid_namespace(self) -> str | None:
        def children(parent: int) -> list[int]:
            return live_processes(lambda f: f.get(b"PPid") == str(parent).encode())

        for bwrap in children(self.pid):
            outside = _pid_namespace(bwrap)
            for child in children(bwrap):
                if (inside := _pid_namespace(child)) not in (None, outside):
                    return inside
        return None

    def status(self, name: str) -> dict[str, str]:
        return ctl_status(self.mp / name)

    def log(self, name: str) -> list[dict[str, Any]]:
        return json_lines(self.mp / name / "log")

    def outbox(self, name: str) -> list[dict[str, Any]]:
        return json_lines(self.mp / name / "outbox")

    def inbox(self, name: str) -> list[dict[str, Any]]:
        return json_lines(self.mp / name / "inbox")

    def created(self, name: str, timeout: float = 15.0) -> dict[str, str]:
        """Wait until agent `name` is no longer `creating` (its create tick committed, or
        failed); returns its ctl status."""
        return wait_until(lambda: (s := self.status(name))["status"] != "creating" and s,
                          timeout, f"{name}'s create tick")

    def wait_ticks(self, name: str, ticks: int, timeout: float = 15.0) -> dict[str, str]:
        """Wait until agent `name` has committed `ticks` ticks; returns its ctl status."""
        return wait_until(lambda: (s := self.status(name))["ticks"] == str(ticks) and s,
                          timeout, f"{name} to reach {ticks} ticks")


MountFactory = Callable[..., Mount]


def module_mount(tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Mount]:
    """A mount for a whole module (a fixture yields from it): its tests use agents of their own."""
    base = tmp_path_factory.mktemp(label)
    base.chmod(0o711)  # the agents' uids pass through it to reach the mount
    (base / "mnt").mkdir()
    m = Mount(init_store(base / "store"), base / "mnt")
    try:
        yield m.start()
    finally:
        m.stop()


@pytest.fixture
def make_mount(tmp_path: Path) -> Iterator[MountFactory]:
    """make_mount(label, store=None, args=()): a new (or the given) store, mounted."""
    with ExitStack() as stack:

        def make(label: str = "m", store: Store | None = None,
                 args: tuple[str, ...] = ()) -> Mount:
            store = store or init_store(tmp_path / f"{label}-store")
            mp = tmp_path / f"{label}-mnt"
            mp.mkdir()
            mount = Mount(store, mp, extra_args=list(args))
            stack.callback(mount.stop)
            return mount.start()

        yield make


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return init_store(tmp_path / "store")


@pytest.fixture
def mount(store: Store, tmp_path: Path) -> Iterator[Mount]:
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(store, mp)
    try:
        yield m.start()
    finally:
        m.stop()


@pytest.fixture(autouse=True)
def tmp_path_for_ticks(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test's tmp_path holds the programs its agents run, the fifos they wait on and
    what they report: open it, and what the test makes in it (umask 0), to the agents'
    uids, which the sandbox gives them (pytest makes tmp_path 0700)."""
    if "tmp_path" in request.fixturenames:
        path: Path = request.getfixturevalue("tmp_path")
        path.chmod(0o777)
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(autouse=True)
def checklogs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose daemons logged a Traceback, unless it says one is expected."""
    yield
    expected = request.node.get_closest_marker("traceback_expected") is not None
    for log, offset in list(_LOGS_CHECKED.items()):
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                new = f.read()
        except FileNotFoundError:
            if not log.parent.exists():
                del _LOGS_CHECKED[log]
            continue
        _LOGS_CHECKED[log] = offset + len(new)
        if b"Traceback" in new and not expected:
            text = new.decode(errors="replace")
            pytest.fail(f"{log} has a Traceback:\n{text[-4000:]}", pytrace=False)

